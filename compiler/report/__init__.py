"""What the compiler shows of its work: per-pass dumps, the HTML page, ``moe-ascend inspect`` and the Ascend coverage
check of a dump's graphs."""
