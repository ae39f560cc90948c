"""Encoder-only campaigns (mode: encoder): records, resume, the view, the report, refusals -- on the tiny random
built-in model (synthetic images) and on a tiny saved ViT encoder read by load_encoder (an image folder)."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from robustvtc.campaign import parse_scenario, read_records, record_key, run_campaign
from robustvtc.campaign.encoder import EncoderCampaign
from robustvtc.campaign.metrics import load_records
from robustvtc.campaign.records import read_manifest
from robustvtc.errors import UserInputError

SCHEMA = {"kind", "sample", "attack", "attack_threat", "eps", "steps", "compressor", "budget", "defense", "adaptive",
          "kept_disruption", "kept_overlap", "rank_spearman", "rank_kendall", "full_token_disruption", "linf", "l2",
          "seconds", "budget_mapping"}


def scenario(**changes):
    base = {"mode": "encoder", "compressors": ["fastervlm", "visionzip", "random"], "budgets": [16, 32],
            "samples": 3, "batch_size": 2, "steps": 1, "attacks": ["fulltoken", "cage", "known_budget"]}
    return parse_scenario({**base, **changes})


@pytest.fixture(scope="module")
def finished(tiny_adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("enc") / "out"
    run_campaign(scenario(), output=out, adapter=tiny_adapter, quiet=True)
    return out, read_records(out / "results.jsonl")


def test_records_schema_keys_and_values(finished, tiny_adapter):
    out, records = finished
    assert records and all(set(r) == SCHEMA and r["kind"] == "encoder" for r in records)
    keys = [record_key(r) for r in records]
    campaign = EncoderCampaign(scenario(), tiny_adapter)
    assert len(keys) == len(set(keys)) and set(keys) == {k for u in campaign.units() for k in campaign.unit_keys(u)}
    cells = Counter((r["attack"], r["compressor"], r["budget"]) for r in records)
    assert set(cells) == {(a, c, b) for a in ("fulltoken", "cage", "known_budget")
                          for c in ("fastervlm", "visionzip", "random") for b in (16, 32)}
    assert set(cells.values()) == {3}  # no clean and no all-tokens records: the full-token distortion is a column
    for r in records:
        assert r["defense"] == "none" and r["adaptive"] is False and r["budget_mapping"]["budget"] == r["budget"]
        assert 0 <= r["kept_overlap"] <= 1 and r["kept_disruption"] > 0 and r["full_token_disruption"] > 0
        assert -1 <= r["rank_spearman"] <= 1 and r["linf"] <= 8 / 255 + 1e-6 and r["seconds"] > 0
    # the full-token distortion and rank correlation are per image: the same in every cell of one crafted image
    grey = [r for r in records if r["attack"] == "cage" and r["sample"] == 0]
    assert len({r["full_token_disruption"] for r in grey}) == 1 and len({r["rank_spearman"] for r in grey}) == 1
    manifest = read_manifest(out)
    assert manifest["scenario"]["mode"] == "encoder" and manifest["status"] == "complete"
    assert manifest["records_expected"] == len(records) and manifest["defenses"] == ["none"]


def test_resume_after_a_kill_gives_the_same_records(finished, tiny_adapter, tmp_path):
    out, records = finished
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    again = tmp_path / "again"
    run_campaign(scenario(), output=again, adapter=tiny_adapter, quiet=True)
    cut = "".join(lines[: len(lines) // 2]) + lines[len(lines) // 2][:20]  # half the records and a torn line
    (again / "results.jsonl").write_text(cut)
    run_campaign(scenario(), output=again, adapter=tiny_adapter, quiet=True, resume=True)
    resumed = read_records(again / "results.jsonl")

    def strip(rs):
        return {record_key(r): {k: v for k, v in r.items() if k != "seconds"} for r in rs}
    assert strip(resumed) == strip(records)
    assert read_manifest(again)["runs"][-1]["resumed_with"] == len(lines) // 2
    with pytest.raises(UserInputError, match="different scenario"):
        run_campaign(scenario(budgets=[8]), output=again, adapter=tiny_adapter, quiet=True, resume=True)


def test_view_and_report(finished):
    from robustvtc.campaign.report import write_report
    from robustvtc.campaign.views import VIEWS

    out, records = finished
    df = load_records(out)
    table = VIEWS["encoder"](df, read_manifest(out))
    assert len(table) == 3 * 3 * 2  # attacks x compressors x budgets at one ε
    row = table.loc[("8/255", "fastervlm@16", "cage")]
    assert row["wins %"].endswith("vs fulltoken") and row["sign p"] != "–"
    assert table.loc[("8/255", "fastervlm@16", "fulltoken")]["wins %"] == "–"  # the baseline itself
    paths = write_report(out)
    md = paths["markdown"].read_text()
    assert "Verdict: encoder screening" in md and "Kept-token distortion and paired wins" in md
    assert "## Clean accuracy" not in md and "## Robust accuracy" not in md and "## Worst case" not in md
    assert "Full-token distortion and cost" in md and paths["encoder_screening"].is_file()


def test_refusals_are_one_line():
    cases = [({"attacks": ["fulltoken", "whitebox"]}, r"attacks\[1\]: whitebox .*accepted: grey-box attacks \(.*cage"),
             ({"compressors": ["fastervlm", "divprune"]}, r"divprune plans on the projected.*accepted: .*fastervlm"),
             ({"compressors": ["fastv"]}, r"fastv decides inside the LLM"),
             ({"compressors": ["tome"]}, r"tome merges inside the encoder"),
             ({"data": {"source": "vqa_jsonl", "path": "x.jsonl"}}, r"data.source: vqa_jsonl holds questions"),
             ({"defenses": ["jpeg"]}, r"defenses: an encoder-only campaign evaluates no defense"),
             ({"attacks": []}, r"attacks: empty"),
             ({"attacks": [{"name": "torchattacks.PGD"}]}, r"attacks\[0\]")]
    for change, pattern in cases:
        with pytest.raises(UserInputError, match=pattern) as info:
            scenario(**change)
        assert "\n" not in str(info.value)
    with pytest.raises(UserInputError, match="mode: encoder for an image folder"):
        parse_scenario({"compressors": ["fastervlm"], "budgets": [16], "attacks": ["cage"],
                        "data": {"source": "images", "path": "imgs"}})
    full = {"compressors": ["fastervlm"], "budgets": [16], "attacks": ["cage"]}
    assert parse_scenario(full).hash() == parse_scenario({**full, "mode": "full"}).hash()
    assert parse_scenario(full).hash() != parse_scenario({**full, "mode": "encoder"}).hash()


# ---------------------------------------------------------------------------------------------- a bare ViT encoder
@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    import numpy as np
    import torch
    from PIL import Image
    from transformers import ViTConfig, ViTModel

    root = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64)
    ViTModel(config, add_pooling_layer=False).save_pretrained(root / "encoder")
    (root / "encoder" / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate([(40, 40), (64, 48), (32, 32), (50, 70)]):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(images / f"img{i}.png")
    (images / "notes.txt").write_text("not an image")
    return root


def test_bare_vit_encoder_on_an_image_folder_through_the_cli(vit_dir, tmp_path):
    from click.testing import CliRunner

    from robustvtc.cli import main

    (tmp_path / "s.yaml").write_text(json.dumps({
        "name": "vit-screen", "mode": "encoder", "model": str(vit_dir / "encoder"),
        "data": {"source": "images", "path": str(vit_dir / "images")}, "samples": 4, "batch_size": 4,
        "compressors": ["fastervlm", "visionzip"], "budgets": [4, 8], "steps": 2,
        "attacks": ["fulltoken", {"name": "cage", "eps": ["2/255", "8/255"]}], "eps": ["2/255", "8/255"]}))
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(main, ["run", str(tmp_path / "s.yaml"), "-o", str(out), "--json", "-q"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["mode"] == "encoder" and summary["records"] == 4 * 2 * 2 * 2 * 2
    assert "Encoder screening" in summary["screening"]["sentence"]
    records = read_records(out / "results.jsonl")
    assert {r["sample"] for r in records} == {"img0.png", "img1.png", "img2.png", "img3.png"}
    manifest = read_manifest(out)
    assert manifest["model"]["family"] == "encoder" and manifest["model"]["num_visual_tokens"] == 16
    assert set(manifest["data"]["images"]) == {"img0.png", "img1.png", "img2.png", "img3.png"}
    assert (out / "report" / "summary.md").is_file()
    view = runner.invoke(main, ["report", str(out), "--view", "encoder"])
    assert view.exit_code == 0 and "fastervlm@4" in view.output and "vs fulltoken" in view.output, view.output
    refused = runner.invoke(main, ["report", str(out), "--view", "accuracy"])
    assert refused.exit_code != 0 and "encoder-only campaign" in refused.output
    assert len(refused.stderr.strip().splitlines()) == 1
    gate = runner.invoke(main, ["run", str(tmp_path / "s.yaml"), "-o", str(out), "--resume", "--fail-under", "40"])
    assert gate.exit_code != 0 and "--fail-under" in gate.output


def test_images_source_checks(vit_dir, tmp_path):
    base = {"mode": "encoder", "model": str(vit_dir / "encoder"), "compressors": ["fastervlm"], "budgets": [4],
            "attacks": ["cage"], "samples": 5, "data": {"source": "images", "path": str(vit_dir / "images")}}
    with pytest.raises(UserInputError, match="holds 4 images but samples is 5"):
        EncoderCampaign(parse_scenario(base))
    with pytest.raises(UserInputError, match="no image file"):
        EncoderCampaign(parse_scenario({**base, "data": {"source": "images", "path": str(tmp_path)}}))
    with pytest.raises(UserInputError, match="data.split: not for source images"):
        parse_scenario({**base, "data": {"source": "images", "path": "x", "split": "test"}})
    with pytest.raises(UserInputError, match="feature_layer, image_mean, image_std"):
        EncoderCampaign(parse_scenario({**base, "samples": 1, "model_kwargs": {"image_size": 64}}))


def test_shipped_encoder_screening_scenario(tiny_adapter, tmp_path):
    from robustvtc.campaign import load_scenario

    s = load_scenario("encoder_screening", {"samples": 2, "steps": 1, "batch_size": 2})
    assert s.mode == "encoder" and s.budgets == (8, 16, 32, 64) and [a.name for a in s.attacks] == ["fulltoken", "cage"]
    run_campaign(s, output=tmp_path / "o", adapter=tiny_adapter, quiet=True)
    records = read_records(tmp_path / "o" / "results.jsonl")
    assert len(records) == 2 * 2 * 2 * 2 * 4  # samples x attacks x eps x compressors x budgets


def test_an_lvlm_by_name_is_screened_through_its_vision_side():
    campaign = EncoderCampaign(scenario(model="builtin", samples=1, attacks=["cage"]))
    assert campaign.adapter.family == "llava" and campaign.adapter.num_visual_tokens == 144
    assert campaign.cells == [(c, b) for c in ("fastervlm", "visionzip", "random") for b in (16, 32)]
