"""Start-up: the CLI's --help, list scenarios and validate, and the record/report modules, import neither torch nor
transformers unless they need them (validate needs the plugin registries, hence torch, not transformers)."""
from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, runpy, sys
args = json.loads(sys.argv[1])
seen = {}
for argv in args:
    before = set(sys.modules)
    sys.argv = ["robustvtc", *argv]
    try:
        runpy.run_module("robustvtc", run_name="__main__")
    except SystemExit:
        pass
    seen[" ".join(argv)] = ["torch" in sys.modules, "transformers" in sys.modules]
import robustvtc.campaign, robustvtc.campaign.metrics, robustvtc.campaign.views, robustvtc.campaign.report
seen["report modules"] = ["torch" in sys.modules, "transformers" in sys.modules]
print(json.dumps(seen))
"""


def imported(*argvs: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argvs)], capture_output=True, text=True,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_help_list_scenarios_and_report_modules_stay_free_of_torch():
    seen = imported(["--help"], ["list", "scenarios"], ["run", "--help"])
    assert seen == {"--help": [False, False], "list scenarios": [False, False], "run --help": [False, False],
                    "report modules": [False, False]}


def test_validate_reads_the_model_config_without_transformers():
    seen = imported(["validate", "quickstart"])
    assert seen["validate quickstart"] == [True, False]  # the registries hold torch plugins


def test_report_on_a_campaign_imports_neither(tiny_adapter, tmp_path):
    from robustvtc.campaign import parse_scenario, run_campaign

    spec = parse_scenario({"compressors": ["fastervlm"], "budgets": [16], "samples": 2, "batch_size": 2, "steps": 1,
                           "attacks": ["fulltoken", "cage"], "eps": ["4/255"]})
    out = run_campaign(spec, output=tmp_path / "run", adapter=tiny_adapter, quiet=True)
    seen = imported(["report", str(out), "-o", str(tmp_path / "report")], ["report", str(out), "--view", "verdict"])
    assert (tmp_path / "report" / "report.html").is_file()
    assert seen[f"report {out} -o {tmp_path / 'report'}"] == [False, False]
    assert seen[f"report {out} --view verdict"] == [False, False]
