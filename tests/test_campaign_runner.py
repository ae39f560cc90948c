"""The campaign runner on a tiny random-weight model: record schema, image and encoder reuse, resume, defenses."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from robustvtc.campaign import Campaign, parse_scenario, read_records, record_key, run_campaign
from robustvtc.campaign.records import REQUIRED_FIELDS
from robustvtc.errors import UserInputError

SCHEMA = {"sample", "qtype", "question", "answer", "attack", "attack_threat", "eps", "steps", "compressor", "budget",
          "defense", "adaptive", "prediction", "correct", "clean_correct", "full_token_correct",
          "clean_full_token_correct", "flagged", "kept_overlap", "rank_spearman", "rank_kendall", "kept_disruption", "linf", "l2", "seconds",
          "budget_mapping"}


def scenario(**changes):
    base = {"compressors": ["fastervlm", "fastv"], "budgets": [16, 32], "samples": 3, "batch_size": 2, "steps": 1,
            "attacks": ["fulltoken", "cage", "known_budget", "whitebox"], "examples": 1}
    return parse_scenario({**base, **changes})


@pytest.fixture(scope="module")
def finished(tiny_adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    run_campaign(scenario(), output=out, adapter=tiny_adapter, quiet=True)
    return out, read_records(out / "results.jsonl")


def test_records_schema_and_exact_key_set(finished, tiny_adapter):
    out, records = finished
    assert all(set(r) == SCHEMA for r in records)
    keys = [record_key(r) for r in records]
    assert len(keys) == len(set(keys))
    campaign = Campaign(scenario(), tiny_adapter)
    assert set(keys) == {k for u in campaign.units() for k in campaign.unit_keys(u)}
    cells = Counter((r["attack"], r["compressor"], r["budget"]) for r in records)
    grid = [("none", 144), ("fastervlm", 16), ("fastervlm", 32), ("fastv", 16), ("fastv", 32)]
    for attack in ("clean", "fulltoken", "cage", "whitebox"):
        assert all(cells[(attack, *cell)] == 3 for cell in grid), attack
    assert cells[("known_budget", "none", 144)] == 0  # a budget-aware attack has no all-tokens cell
    r = next(r for r in records if r["attack"] == "cage" and r["compressor"] == "fastervlm")
    assert r["attack_threat"] == "encoder gradients only, compressor unknown, budget unknown, no text"
    assert abs(r["eps"] - 8 / 255) < 1e-12 and r["steps"] == 1 and r["defense"] == "none" and r["adaptive"] is False
    assert r["linf"] <= 8 / 255 + 1e-6 and r["l2"] > 0 and r["seconds"] > 0
    assert 0 <= r["kept_overlap"] <= 1 and -1 <= r["rank_spearman"] <= 1 and r["kept_disruption"] > 0
    fastv = next(r for r in records if r["compressor"] == "fastv")
    assert fastv["kept_overlap"] is None and fastv["kept_disruption"] is None  # decides inside the LLM
    assert fastv["budget_mapping"]["budget"] == fastv["budget"] and len(fastv["budget_mapping"]) > 1
    clean = [r for r in records if r["attack"] == "clean"]
    assert all(r["correct"] == r["clean_correct"] and r["kept_overlap"] in (None, 1.0) and r["linf"] == 0
               for r in clean)


def test_clean_and_full_token_columns_are_consistent(finished):
    _, records = finished
    by_key = {record_key(r): r for r in records}
    for r in records:
        clean = by_key[(r["sample"], "clean", 0.0, r["compressor"], r["budget"], r["defense"], False)]
        assert r["clean_correct"] == clean["correct"]
        clean_full = by_key[(r["sample"], "clean", 0.0, "none", 144, r["defense"], False)]
        assert r["clean_full_token_correct"] == clean_full["correct"]
        full = by_key.get((r["sample"], r["attack"], r["eps"], "none", 144, r["defense"], r["adaptive"]))
        if full is not None:  # the same adversarial image on the full-token model
            assert r["full_token_correct"] == full["correct"]


def test_manifest_and_examples(finished):
    out, _ = finished
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["records"] == manifest["records_expected"]
    for key in ("scenario", "scenario_hash", "versions", "git", "seed", "dtype", "device", "batch_size", "model"):
        assert key in manifest
    assert manifest["versions"]["torch"] and manifest["attacks"]["cage"]["params"]["steps"] == 1
    examples = [json.loads(line) for line in (out / "examples" / "examples.jsonl").read_text().splitlines()]
    assert {e["sample"] for e in examples} == {0}  # examples: 1
    e = next(e for e in examples if e["compressor"] == "fastervlm" and e["budget"] == 16)
    assert len(e["kept_clean"]) == 16 and (out / "examples" / e["adv_image"]).is_file()


def test_images_once_per_knowledge_level_and_one_encoder_pass_per_grid(tiny_adapter, tmp_path, monkeypatch):
    from robustvtc.attacks.base import Attack
    from robustvtc.campaign import runner

    crafted, grids = Counter(), []
    call = Attack.__call__
    monkeypatch.setattr(Attack, "__call__", lambda self, *a, **k: (crafted.update([self.name]), call(self, *a, **k))[1])
    grid = runner.evaluate_grid
    encode = type(tiny_adapter).encode

    def counting_grid(targets, *args, **kwargs):
        calls = []
        monkeypatch.setattr(type(tiny_adapter), "encode",
                            lambda self, *a, **k: (calls.append(1), encode(self, *a, **k))[1])
        try:
            return grid(targets, *args, **kwargs)
        finally:
            monkeypatch.setattr(type(tiny_adapter), "encode", encode)
            grids.append((len(targets), len(calls)))
    monkeypatch.setattr(runner, "evaluate_grid", counting_grid)
    attacks = ["fulltoken", {"name": "cage", "eps": ["4/255", "8/255"]}, "known_budget", "whitebox"]
    run_campaign(scenario(compressors=["fastervlm", "visionzip"], budgets=[16, 32, 48], samples=4, attacks=attacks),
                 output=tmp_path / "out", adapter=tiny_adapter, quiet=True)
    chunks = 2
    assert crafted == {"fulltoken": chunks, "cage": 2 * chunks, "known_budget": 3 * chunks, "whitebox": 7 * chunks}
    assert grids and all(encodes == 1 for _, encodes in grids)  # one encoder pass however many targets
    assert max(n for n, _ in grids) == 7


def test_refuses_existing_output_and_changed_scenario(tiny_adapter, tmp_path):
    out = tmp_path / "out"
    small = scenario(attacks=["fulltoken"], compressors=["fastervlm"], budgets=[16], samples=2)
    run_campaign(small, output=out, adapter=tiny_adapter, quiet=True)
    with pytest.raises(UserInputError, match="already holds a campaign; accepted: --resume"):
        run_campaign(small, output=out, adapter=tiny_adapter, quiet=True)
    changed = scenario(attacks=["fulltoken"], compressors=["fastervlm"], budgets=[16], samples=2, seed=1)
    with pytest.raises(UserInputError, match="holds a campaign of a different scenario"):
        run_campaign(changed, output=out, resume=True, adapter=tiny_adapter, quiet=True)
    before = (out / "results.jsonl").read_text()
    run_campaign(small, output=out, resume=True, adapter=tiny_adapter, quiet=True)  # nothing left to do
    assert (out / "results.jsonl").read_text() == before
    run_campaign(changed, output=out, overwrite=True, adapter=tiny_adapter, quiet=True)
    assert json.loads((out / "manifest.json").read_text())["seed"] == 1


def test_torn_last_line_is_dropped_and_repaired(tmp_path):
    path = tmp_path / "results.jsonl"
    good = {k: 0 for k in REQUIRED_FIELDS}
    path.write_text(json.dumps(good) + "\n" + '{"sample": 1, "att')
    assert read_records(path) == [good]
    read_records(path, repair=True)
    assert path.read_text() == json.dumps(good) + "\n"
    path.write_text('{"broken\n' + json.dumps(good) + "\n")
    with pytest.raises(UserInputError, match="line 1 is not a JSON record"):
        read_records(path)


def test_defenses_non_adaptive_and_adaptive(tiny_adapter, tmp_path):
    s = scenario(attacks=["fulltoken", "whitebox"], compressors=["fastervlm", "fastv"], budgets=[16], samples=2,
                 defenses=[{"gaussian_noise": {"sigma": 0.02}}, {"score_noise": {"sigma": 0.5}}], eot_samples=2)
    out = run_campaign(s, output=tmp_path / "out", adapter=tiny_adapter, quiet=True)
    records = read_records(out / "results.jsonl")
    rows = Counter((r["attack"], r["defense"], r["adaptive"], r["compressor"]) for r in records)
    noise = "gaussian_noise(sigma=0.02)"
    for defense in ("none", noise, "score_noise(sigma=0.5)"):
        assert rows[("clean", defense, False, "none")] == 2
        assert rows[("fulltoken", defense, False, "fastervlm")] == 2  # crafted undefended, transferred
    for defense in (noise, "score_noise(sigma=0.5)"):
        assert rows[("fulltoken", defense, True, "fastervlm")] == 2  # crafted through the defense
    assert rows[("whitebox", "none", True, "fastervlm")] == 0  # "none" has no adaptive variant
    assert rows[("clean", "score_noise(sigma=0.5)", False, "fastv")] == 0  # a score defense needs a ranking compressor
    assert rows[("whitebox", noise, True, "fastv")] == 2
    again = run_campaign(s, output=tmp_path / "again", adapter=tiny_adapter, quiet=True)
    strip = lambda rs: sorted(json.dumps({k: v for k, v in r.items() if k != "seconds"}, sort_keys=True) for r in rs)
    assert strip(read_records(again / "results.jsonl")) == strip(records)  # randomised defenses are seeded


def test_incompatible_settings_fail_before_any_work(tiny_adapter, tmp_path):
    with pytest.raises(UserInputError, match="budgets: budget 999 out of range"):
        Campaign(scenario(budgets=[999]), tiny_adapter)
    with pytest.raises(UserInputError, match=r"attacks \(stealth\): no compressor x budget of the scenario"):
        Campaign(scenario(compressors=["none"], attacks=["stealth"]), tiny_adapter)
    with pytest.raises(UserInputError, match=r"attacks \(cage\): .*k_min"):
        Campaign(scenario(attacks=[{"name": "cage", "k_min": 100, "k_max": 10}]), tiny_adapter)
    assert not (tmp_path / "out").exists()


def test_save_images_and_file_data(tiny_adapter, tmp_path):
    from PIL import Image

    from robustvtc.data import synthetic as S

    rows = []
    for i, sample in enumerate(S.generate_dataset(2, "val")):
        Image.fromarray(sample.image).save(tmp_path / f"{i}.png")
        rows.append({"id": f"q{i}", "image": f"{i}.png", "question": sample.question,
                     "options": [sample.answer, "zebra"], "answer": 0})
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = parse_scenario({"compressors": ["fastervlm"], "budgets": [16], "samples": 2, "steps": 1,
                        "attacks": ["fulltoken"], "save_images": True,
                        "data": {"source": "multiple_choice", "path": str(tmp_path / "mc.jsonl")}})
    out = run_campaign(s, output=tmp_path / "out", adapter=tiny_adapter, quiet=True)
    records = read_records(out / "results.jsonl")
    assert {r["sample"] for r in records} == {"q0", "q1"} and {r["answer"] for r in records} == {"A"}
    assert {r["prediction"] for r in records} <= {"A", "B"}
    assert len(list((out / "images").glob("*.png"))) == 2
    with pytest.raises(UserInputError, match="holds 2 items but samples is 5"):
        Campaign(parse_scenario({"compressors": ["none"], "budgets": [16], "attacks": ["fulltoken"], "samples": 5,
                                 "data": {"source": "multiple_choice", "path": str(tmp_path / "mc.jsonl")}}),
                 tiny_adapter)
