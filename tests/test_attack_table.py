"""The attack-table experiment on the tiny random-weight model: shape of the grid, which cells exist, the CLI."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
from click.testing import CliRunner

from robustvtc.attack_table import ALL, ROWS, attack_table, command
from robustvtc.errors import UserInputError


def test_table_has_every_attack_and_cell(tiny_adapter):
    lines: list[str] = []
    table = attack_table(tiny_adapter, compressors=("fastervlm", "none"), budgets=(16, 32), samples=2, steps=1,
                         batch_size=2, show=lines.append)
    assert list(table.index) == ["clean", *ROWS, "stealth (full tokens)"]
    assert list(table.columns) == ["fastervlm@16", "fastervlm@32", ALL]
    for row in table.index:
        for col in table.columns:
            value = table.loc[row, col]
            no_cell = col == ALL and row in ("known_budget", "stealth", "stealth (full tokens)")
            assert math.isnan(value) if no_cell else 0 <= value <= 100
    records = table.attrs["records"]
    assert len(records[(records.attack == "clean")]) == 2 * 3  # 2 samples x 3 columns, one encoder pass each
    assert "fastervlm@16" in lines[-1] and "8/255" in lines[0]


def test_table_rejects_unknown_rows_and_eps_before_loading(tiny_adapter):
    with pytest.raises(UserInputError, match="unknown attack row"):
        attack_table("no-such-model", attacks=("nope",))
    with pytest.raises(UserInputError, match="eps"):
        attack_table("no-such-model", eps="eight")


def test_cli_help_and_usage_error():
    runner = CliRunner()
    assert "compressor x budget" in runner.invoke(command, ["--help"]).output
    bad = runner.invoke(command, ["--attacks", "nope"])
    assert bad.exit_code == 2 and "unknown attack row" in bad.output


def test_module_runs_as_a_script():
    out = subprocess.run([sys.executable, "-m", "robustvtc.attack_table", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "--budgets" in out.stdout
