"""The moe-ascend command: doctor, and the commands that arrive with later issues."""

import subprocess
import sys

from moe_ascend.compiler.cli import main
from moe_ascend.compiler.doctor import checks


def test_doctor_reports_each_capability():
    out = subprocess.run([sys.executable, "-m", "moe_ascend.compiler.cli", "doctor"], capture_output=True, text=True,
                         check=True).stdout
    for what in ("torch", "target inductor", "CUDA", "target ascend", "graphviz", "emulated cluster"):
        assert what in out
    ascend = next(row for row in checks() if row[0].startswith("target ascend"))
    assert ascend[1] is False and "torch_npu" in ascend[2]


def test_console_script_is_installed():
    import importlib.metadata

    (script,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "moe-ascend"]
    assert script.value == "moe_ascend.compiler.cli:main"
    (backend,) = [e for e in importlib.metadata.entry_points(group="torch_dynamo_backends") if e.name == "moe_ascend"]
    assert backend.load().__name__ == "moe_ascend"


def test_unknown_benchmark_lists_the_known_ones(capsys):
    assert main(["bench", "no_such_bench"]) == 2
    assert "compile_overhead" in capsys.readouterr().err

