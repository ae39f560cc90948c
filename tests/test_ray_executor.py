"""The Ray executor on a local cluster this module starts (ray.init(num_cpus=2)): the same records as a local
run, a killed worker's unit run again, a killed driver resumed with --resume; the driver alone writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from robustvtc.campaign import parse_scenario, read_records, record_key, run_campaign
from robustvtc.campaign.ray_executor import TEST_WORKER_CRASH, RayExecutor, release_workers
from robustvtc.safe_io import LEDGER_NAME, LOCK_NAME

# 2 chunks x (clean, fulltoken, cage) = 6 units of 2 samples x 2 cells: 24 records, every side-file kind
BASE = {"compressors": ["fastervlm"], "budgets": [16], "samples": 4, "batch_size": 2, "steps": 1,
        "attacks": ["fulltoken", "cage"], "examples": 1, "save_images": True}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local 2-CPU Ray cluster for the module; workers inherit the worker-crash hook's file name."""
    ray = pytest.importorskip("ray", reason='Ray is not installed: pip install "robustvtc[ray]" (make test does)')
    arm = tmp_path_factory.mktemp("hook") / "kill-one-worker"
    os.environ[TEST_WORKER_CRASH] = str(arm)
    try:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    except Exception as exc:  # noqa: BLE001 -- a machine where Ray cannot start its processes
        pytest.skip(f"a local Ray cluster could not start here: {str(exc).splitlines()[0][:200]}")
    yield {"arm": arm, "address": ray.get_runtime_context().gcs_address}
    release_workers()
    ray.shutdown()
    os.environ.pop(TEST_WORKER_CRASH, None)


@pytest.fixture(scope="module")
def local_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "out"
    run_campaign(parse_scenario({**BASE, "model": str(tiny_model_dir)}), output=out, quiet=True)
    return out


def _strip(records):
    """Records by key without their timing field."""
    return {record_key(r): {k: v for k, v in r.items() if k != "seconds"} for r in records}


def _side_files(out: Path) -> dict:
    """Every file a campaign wrote beside results.jsonl and manifest.json, by content (examples.jsonl as a set
    of lines: units finish in any order under Ray)."""
    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        name = path.relative_to(out).as_posix()
        if name in ("results.jsonl", "manifest.json"):
            continue
        data = path.read_bytes()
        files[name] = sorted(data.decode().splitlines()) if name.endswith(".jsonl") or name == LEDGER_NAME else data
    return files


def test_ray_records_equal_a_local_run(cluster, tiny_model_dir, local_run, tmp_path):
    """The identical-records test: 2 workers, records (but for ``seconds``), example maps, PNGs and the ledger
    equal a local run's; units were spread over both workers; the manifest says complete."""
    out = tmp_path / "ray"
    executor = RayExecutor(cpus_per_unit=1, keep_workers=True)  # the next test reuses the workers
    run_campaign(parse_scenario({**BASE, "model": str(tiny_model_dir), "executor": {"type": "ray"}}), output=out,
                 quiet=True, executor=executor)
    local = read_records(local_run / "results.jsonl")
    assert len(local) == 24
    assert _strip(read_records(out / "results.jsonl")) == _strip(local)
    assert _side_files(out) == _side_files(local_run)
    assert executor.stats["workers"] == 2 and len(executor.stats["units"]) == 2, executor.stats  # both worked
    assert sum(executor.stats["units"].values()) == 6
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["records"] == 24 and not (out / LOCK_NAME).exists()
    assert manifest["scenario"]["executor"]["type"] == "ray"
    assert manifest["scenario_hash"] == json.loads((local_run / "manifest.json").read_text())["scenario_hash"]


def test_a_killed_worker_is_replaced_and_its_unit_run_again(cluster, tiny_model_dir, local_run, tmp_path):
    cluster["arm"].touch()  # the first worker to start a unit SIGKILLs itself
    out = tmp_path / "ray"
    executor = RayExecutor(keep_workers=True)
    run_campaign(parse_scenario({**BASE, "model": str(tiny_model_dir), "executor": "ray"}), output=out, quiet=True,
                 executor=executor)
    assert not cluster["arm"].exists() and executor.stats["retries"] == 1
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 24  # the lost unit's records written once
    assert _strip(read_records(out / "results.jsonl")) == _strip(read_records(local_run / "results.jsonl"))


def test_a_killed_driver_resumes_under_ray_with_the_same_records(cluster, tiny_model_dir, local_run, tmp_path):
    """`robustvtc run --executor ray` SIGKILLed after 9 records (mid-unit), then `--resume --executor ray`:
    the local run's records, each once, and the dead driver's lock taken over."""
    release_workers()  # the kept workers hold the cluster's 2 CPUs
    scenario = tmp_path / "s.yaml"
    scenario.write_text(yaml.safe_dump({**BASE, "model": str(tiny_model_dir)}))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "robustvtc", "run", str(scenario), "-o", str(out), "--executor", "ray",
               "--address", cluster["address"], "--set", "executor.workers=1", "--no-report", "-q", "--threads", "1"]
    env = {**os.environ, "ROBUSTVTC_TEST_CRASH": "after:9", "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert len((out / "results.jsonl").read_text().splitlines()) == 9
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"  # no chance to say more
    env.pop("ROBUSTVTC_TEST_CRASH")
    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 24 and all(json.loads(line) for line in lines)
    assert _strip(read_records(out / "results.jsonl")) == _strip(read_records(local_run / "results.jsonl"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and [r["resumed_with"] for r in manifest["runs"]] == [0, 9]
    assert _side_files(out) == _side_files(local_run)


def test_scenario_executor_keys_are_checked():
    from robustvtc.errors import UserInputError

    spec = parse_scenario({**BASE, "executor": {"type": "ray", "address": "auto", "cpus_per_unit": 2}})
    assert (spec.executor.type, spec.executor.address, spec.executor.gpus_per_unit) == ("ray", "auto", 0)
    assert spec.hash() == parse_scenario(BASE).hash()  # where units run changes no record
    assert parse_scenario({**BASE, "device": "cpu", "executor": "local"}).executor.type == "local"
    for bad, words in ((("type", "spark"),), "executor.type"), ((("workers", 0),), "executor.workers"), \
                      ((("gpus_per_unit", 1),), "GPUs they never use"), ((("cpus_per_unit", 0),), "cpus_per_unit"):
        with pytest.raises(UserInputError, match=words):
            parse_scenario({**BASE, "executor": {"type": "ray", **dict(bad)}})
    with pytest.raises(UserInputError, match="only for type ray"):
        parse_scenario({**BASE, "executor": {"type": "local", "address": "auto"}})


def test_without_ray_executor_ray_is_one_line_saying_how_to_install(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from robustvtc.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, as when it is not installed
    result = CliRunner().invoke(main, ["run", "quickstart", "--samples", "1", "-o", str(tmp_path / "out"),
                                       "--executor", "ray"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and 'pip install "robustvtc[ray]"' in lines[0], result.output
    assert not (tmp_path / "out" / "results.jsonl").exists()
