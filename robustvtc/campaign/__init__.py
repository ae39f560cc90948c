"""Campaigns: a YAML scenario -> per-sample records (results.jsonl + manifest.json) -> metrics and reports.

The names below are imported on first use, so reading records, scenarios and reports does not import torch."""
from __future__ import annotations

import importlib

_PUBLIC = {
    "Executor": "executor", "LocalExecutor": "executor", "read_records": "records", "record_key": "records",
    "Campaign": "runner", "WorkUnit": "runner", "run_campaign": "runner", "Scenario": "scenario",
    "load_scenario": "scenario", "parse_scenario": "scenario", "shipped_scenarios": "scenario",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
