"""CLI: honest exit codes, one-line errors without tracebacks for user mistakes."""
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from robustvtc.cli import main


def run(*args):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("args,needle", [
    (["run", "quickstart", "--set", "compressors=[nope]"], "compressors[0]: 'nope' is not accepted; accepted:"),
    (["run", "quickstart", "--model", "no-such-model", "--dry-run"], "unknown model 'no-such-model'; accepted: builtin"),
    (["validate", "quickstart", "--set", "budgets=[0]"], "budgets[0]: 0 is not a budget"),
    (["validate", "quickstart", "--set", "budgets=[16, 500]"],
     "budgets[1]: 500 exceeds the 144 visual tokens of builtin (read from its config); accepted: 1..144 or 'all'"),
    (["run", "quickstart", "--dtype", "float8"], "dtype: 'float8' is not accepted"),
    (["report", ".", "--view", "nope"], "no campaign results at ."),
])
def test_user_errors_exit_2_with_one_line(args, needle):
    res = run(*args)
    assert res.exit_code == 2, res.output
    assert needle in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1


def test_list_compressors_models_and_attacks():
    res = run("list", "compressors")
    assert res.exit_code == 0
    assert res.output.splitlines()[0].split() == ["name", "stage", "text-aware", "native", "knob", "fidelity"]
    assert any(line.startswith("fastervlm") and "pre_llm" in line for line in res.output.splitlines())
    assert "random" not in run("list", "compressors", "faster*").output
    models = run("list", "models").output.splitlines()
    assert any(line.startswith("builtin ") and "built-in" in line for line in models)
    assert any(line.startswith("llava ") and "family" in line for line in models)
    assert any(line.startswith("cage") and "compression_aligned" in line for line in run("list", "attacks").output
               .splitlines())


def test_real_process_exit_code_and_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "robustvtc", "validate", "quickstart", "--set", "budgets=[999]"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: budgets[0]: 999 exceeds") and "Traceback" not in proc.stderr


def test_namespace_packages_resolve():
    import robustvtc.attacks
    import robustvtc.defenses
    import robustvtc.scenarios

    assert robustvtc.attacks.__file__.replace("\\", "/").endswith("attacks/__init__.py")


# ---------------------------------------------------------------------------------------------- campaigns
import json  # noqa: E402

import yaml  # noqa: E402



@pytest.fixture(scope="module")
def scenario_file(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "s.yaml"
    path.write_text(yaml.safe_dump({"model": str(tiny_model_dir), "compressors": ["fastervlm"], "budgets": [16],
                                    "samples": 2, "steps": 1, "attacks": ["fulltoken", "cage"]}))
    return path


@pytest.fixture(scope="module")
def run_dir(scenario_file):
    out = scenario_file.parent / "run"
    res = run("run", str(scenario_file), "-o", str(out), "--quiet")
    assert res.exit_code == 0, res.output
    return out


def test_run_writes_results_report_and_summary(scenario_file, run_dir):
    assert (run_dir / "results.jsonl").is_file() and (run_dir / "report" / "report.html").is_file()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["scenario"]["samples"] == 2
    res = run("run", str(scenario_file), "-o", str(run_dir), "--resume", "--no-report")
    assert res.exit_code == 0 and "Accuracy (%) without defense" in res.output
    assert res.output.index("clean") < res.output.index("fulltoken")


@pytest.mark.parametrize("gate,code,needle", [("0", 0, "gate PASS (fail-under)"), ("100", 1, "gate FAIL (fail-under)")])  # a cell with k < n: upper bound < 100
def test_fail_under_gate_on_run_and_report(scenario_file, run_dir, tmp_path, gate, code, needle):
    res = run("report", str(run_dir), "-o", str(tmp_path / "r"), "--fail-under", gate)
    assert res.exit_code == code and needle in res.output, res.output
    res = run("run", str(scenario_file), "-o", str(run_dir), "--resume", "--quiet", "--no-report", "--fail-under", gate)
    assert res.exit_code == code and needle in res.output, res.output


@pytest.mark.parametrize("args,needle", [
    (["run", "no-such.yaml"], "error: scenario not found: no-such.yaml; accepted: a YAML file or a shipped scenario"),
    (["run", "quickstart", "--set", "attacks.0.eps=huge"], "attacks[0].eps[0]: 'huge' is not a radius; accepted:"),
    (["run", "quickstart", "--set", "samples"], "--set 'samples': expected KEY=VALUE"),
    (["run", "quickstart", "--resume", "--overwrite"], "--resume and --overwrite contradict each other"),
    (["run", "quickstart", "--fail-under", "120"], "Invalid value for '--fail-under'"),
    (["validate", "quickstart", "--set", "budgets=[16, -1]"], "budgets[1]: -1 is not a budget"),
    (["compare", ".", "."], "no campaign results at ."),
])
def test_campaign_usage_errors_exit_2(args, needle):
    res = run(*args)
    assert res.exit_code == 2, res.output
    assert needle in res.output and "Traceback" not in res.output


def test_run_refuses_to_mix_campaigns(scenario_file, run_dir):
    res = run("run", str(scenario_file), "-o", str(run_dir), "--quiet")
    assert res.exit_code == 2 and "already holds a campaign; accepted: --resume" in res.output
    res = run("run", str(scenario_file), "-o", str(run_dir), "--resume", "--quiet", "--seed", "5")
    assert res.exit_code == 2 and "holds a campaign of a different scenario" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_runtime_error_exits_3(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"model": str(broken), "compressors": ["none"], "budgets": ["all"],
                                    "attacks": ["fulltoken"], "samples": 1}))
    res = run("run", str(path), "-o", str(tmp_path / "out"), "--quiet")
    assert res.exit_code == 3 and res.output.startswith("runtime error:") and "Traceback" not in res.output


def test_validate_and_list(scenario_file):
    res = run("validate", "quickstart", "budget_sweep", str(scenario_file))
    assert res.exit_code == 0 and res.output.count(": ok -- ") == 3
    bad = scenario_file.parent / "bad.yaml"
    bad.write_text("compressors: [none]\nbudgets: [16]\nattacks: [fulltoken]\nsamples: 2\nsteps: lots\n")
    res = run("validate", str(bad))
    assert res.exit_code == 2 and res.output.strip() == (f"error: {bad}: steps: 'lots' is not an integer >= 0; "
                                                         "accepted: an integer >= 0")
    names = run("list", "scenarios").output
    assert "quickstart" in names and "cage_vs_fulltoken" in names
    attacks = run("list", "attacks").output
    assert any(line.startswith("cage") and "encoder gradients only" in line for line in attacks.splitlines())
    assert "jpeg" in run("list", "defenses").output


def test_compare_gate(run_dir, tmp_path):
    records = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]

    def variant(name, cage_correct):
        folder = tmp_path / name
        folder.mkdir()
        rows = [{**r, "correct": cage_correct if r["attack"] == "cage" else True} for r in records]
        (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(folder)
    good, bad = variant("good", True), variant("bad", False)
    res = run("compare", good, bad, "--csv", str(tmp_path / "c.csv"))
    assert res.exit_code == 0 and "-100.0" in res.output and (tmp_path / "c.csv").is_file()
    assert run("compare", bad, good, "--fail-drop", "0").exit_code == 4  # 2 samples decide nothing
    drop = run("compare", good, bad, "--fail-drop", "5")
    assert drop.exit_code == 4 and "gate INCONCLUSIVE (fail-drop): cage on" in drop.output  # tests/test_gates.py: FAIL


@pytest.mark.parametrize("command", ["run", "validate", "report", "compare", "list", "rebuild-manifest"])
def test_every_command_has_help_with_examples(command):
    res = run(command, "--help")
    assert res.exit_code == 0 and "Example" in res.output


def test_report_help_names_every_view():
    from robustvtc.campaign.views import VIEWS

    text = " ".join(run("report", "--help").output.split())
    assert all(name in text for name in VIEWS), text


def test_report_json_and_views(run_dir, tmp_path):
    res = CliRunner().invoke(main, ["report", str(run_dir), "-o", str(tmp_path / "r"), "--json", "--fail-under", "0"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["records"] > 0 and data["gate"]["outcome"] == "PASS" and "sentence" in data["verdict"]
    assert data["report"]["html"].endswith("report.html")
    views = CliRunner().invoke(main, ["report", str(run_dir), "--view", "attacks", "--view", "accuracy"])
    assert views.exit_code == 0 and "attacks:" in views.output and "all tokens" in views.output
    assert "fastervlm@16" in views.output
    as_json = json.loads(CliRunner().invoke(main, ["report", str(run_dir), "--view", "verdict", "--json"]).stdout)
    assert as_json["views"]["verdict"][0]["compressor"] in ("fastervlm", "none")


def test_dry_run_writes_nothing_and_estimates(scenario_file, tmp_path):
    out = tmp_path / "dry"
    res = CliRunner().invoke(main, ["run", str(scenario_file), "-o", str(out), "--dry-run", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["units"] == 3 and data["records"] > 0 and data["estimate_seconds"] > 0
    assert not out.exists()


def test_progress_lines_without_a_terminal_and_quiet(scenario_file, tmp_path):
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    loud = subprocess.run([sys.executable, "-m", "robustvtc", "run", str(scenario_file), "-o", str(tmp_path / "a"),
                           "--no-report"], capture_output=True, text=True, env=env)
    assert loud.returncode == 0, loud.stderr
    assert "records (100.0 %)" in loud.stderr and "elapsed" in loud.stderr  # the closing progress line
    assert "FutureWarning" not in loud.stderr and "Warning" not in loud.stderr
    quiet = subprocess.run([sys.executable, "-m", "robustvtc", "run", str(scenario_file), "-o", str(tmp_path / "b"),
                            "--no-report", "-q"], capture_output=True, text=True, env=env)
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == ""


def test_interrupt_prints_the_exact_command_to_resume(scenario_file, tmp_path, monkeypatch):
    from robustvtc import cli
    from robustvtc.campaign import runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(runner, "run_campaign", interrupted)
    monkeypatch.setattr("robustvtc.campaign.run_campaign", interrupted)
    args = ["run", str(scenario_file), "-o", str(tmp_path / "x"), "--samples", "2", "--overwrite"]
    monkeypatch.setattr(sys, "argv", ["robustvtc", *args])
    res = CliRunner().invoke(cli.main, args)
    assert res.exit_code == 130
    assert f"continue with: robustvtc run {scenario_file} -o {tmp_path / 'x'} --samples 2 --resume" in res.output
