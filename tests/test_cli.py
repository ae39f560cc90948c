"""CLI: honest exit codes, one-line errors without tracebacks for user mistakes."""
import subprocess
import sys

import pytest
from click.testing import CliRunner

from robustvtc.cli import main


def run(*args):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("args,needle", [
    (["evaluate", "--compressors", "nope"], "unknown compressor 'nope'; accepted:"),
    (["evaluate", "--model", "no-such-model"], "unknown model 'no-such-model'; accepted: builtin"),
    (["evaluate", "--budgets", "0"], "budget 0 out of range; accepted: 1..144"),
    (["evaluate", "--budgets", "abc"], "budget 'abc' is not an integer"),
    (["evaluate", "--dtype", "float8"], "unknown dtype 'float8'"),
])
def test_user_errors_exit_2_with_one_line(args, needle):
    res = run(*args)
    assert res.exit_code == 2, res.output
    assert needle in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1


def test_list_compressors_shows_metadata():
    res = run("list", "compressors")
    assert res.exit_code == 0
    assert res.output.splitlines()[0].split() == ["name", "stage", "text-aware", "native", "knob"]
    assert any(line.startswith("fastervlm") and "pre_llm" in line for line in res.output.splitlines())
    assert "random" not in run("list", "compressors", "faster*").output


def test_evaluate_prints_table():
    res = run("evaluate", "--samples", "10", "--batch-size", "5", "--compressors", "none,fastervlm", "--budgets", "16,all")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[1].split() == ["budget", "16", "144"]
    assert any(line.startswith("fastervlm") for line in lines) and any(line.startswith("none") for line in lines)


def test_real_process_exit_code_and_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "robustvtc.cli", "evaluate", "--budgets", "999"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: budget 999 out of range") and "Traceback" not in proc.stderr


def test_namespace_packages_resolve():
    import robustvtc.attacks
    import robustvtc.defenses
    import robustvtc.scenarios

    assert robustvtc.attacks.__file__.replace("\\", "/").endswith("attacks/__init__.py")
