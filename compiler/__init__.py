"""The backend entry, options, stage pipeline, lowering targets, dumps, cost model and CLI."""
