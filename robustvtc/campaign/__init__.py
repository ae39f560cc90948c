"""Campaigns: a YAML scenario -> per-sample records (results.jsonl + manifest.json) -> metrics and reports."""
from .executor import Executor, LocalExecutor
from .records import read_records, record_key
from .runner import Campaign, WorkUnit, run_campaign
from .scenario import Scenario, load_scenario, parse_scenario, shipped_scenarios

__all__ = ["Campaign", "Executor", "LocalExecutor", "Scenario", "WorkUnit", "load_scenario", "parse_scenario",
           "read_records", "record_key", "run_campaign", "shipped_scenarios"]
