"""Benchmarks from local Hugging Face datasets run as campaigns (data source hf): scenario validation, the
preset's prompts, records with the official ``score``, the benchmark view and report section, and the data
fingerprint that --resume compares (rows and images)."""
from __future__ import annotations

import io
import json

import pytest

from robustvtc.campaign import parse_scenario, read_records, run_campaign
from robustvtc.campaign import views as V
from robustvtc.campaign.metrics import load_records
from robustvtc.campaign.records import read_manifest
from robustvtc.campaign.tasks import Task
from robustvtc.data.presets import SHORT_ANSWER, vqa_accuracy
from robustvtc.errors import UserInputError

datasets = pytest.importorskip("datasets")


def png(colour) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (24, 24), colour).save(buf, format="PNG")
    return buf.getvalue()


def save(rows: dict, where):
    features = datasets.Dataset.from_dict({k: v for k, v in rows.items() if k != "image"}).features
    features["image"] = datasets.Image()
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(str(where))
    return where


@pytest.fixture
def textvqa(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # where dataset images are written once
    return save({"question_id": [1, 2, 3], "question": ["what is written?", "what colour?", "how many?"],
                 "image": [{"bytes": png((200, 10 * i, 10)), "path": f"{i}.png"} for i in range(3)],
                 "answers": [["stop"] * 10, ["red"] * 2 + ["blue"] * 8, ["2"] * 10]}, tmp_path / "textvqa")


@pytest.fixture
def pope(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return save({"question_id": ["1", "2", "3", "4"],
                 "question": [f"Is there a {w} in the image?" for w in ("dog", "cat", "car", "bird")],
                 "answer": ["yes", "no", "yes", "no"], "category": ["adversarial"] * 2 + ["random"] * 2,
                 "image": [{"bytes": png((10, 30 * i, 90)), "path": f"{i}.png"} for i in range(4)]},
                tmp_path / "pope")


def hf_scenario(path, preset, **changes):
    base = {"compressors": ["visionzip"], "budgets": [16], "attacks": ["fulltoken"], "steps": 1, "samples": 3,
            "batch_size": 4, "data": {"source": "hf", "path": str(path), "preset": preset, "split": "validation",
                                      "max_new_tokens": 2}}
    return parse_scenario({**base, **changes})


def test_validation_names_the_key_and_what_is_accepted(tmp_path):
    def fails(data, match):
        with pytest.raises(UserInputError, match=match):
            parse_scenario({"compressors": ["none"], "budgets": [16], "attacks": [], "data": data})

    fails({"source": "hf", "path": "x"}, r"data\.preset: missing; accepted: one of textvqa, vqav2, gqa, pope, mme")
    fails({"source": "hf", "path": "x", "preset": "okvqa"}, r"data\.preset: 'okvqa' is not accepted; accepted: "
                                                            "textvqa, vqav2")
    fails({"source": "hf", "preset": "pope"}, r"data\.path: missing; accepted: .*save_to_disk folder")
    fails({"source": "hf", "path": "x", "preset": "pope", "split": 3}, r"data\.split: 3 is not a non-empty string")
    fails({"source": "hf", "path": "x", "preset": "pope", "csv_name": "q.csv"}, r"data\.csv_name: only for")
    fails({"source": "vqa_jsonl", "path": "x", "preset": "pope"}, r"data\.preset: only for source hf")
    fails({"source": "synthetic", "preset": "pope"}, r"data\.preset: only for file data")
    s = parse_scenario({"compressors": ["none"], "budgets": [16], "attacks": [],
                        "data": {"source": "hf", "path": "d", "preset": "gqa"}}, base_dir=tmp_path)
    assert s.data.path == str(tmp_path / "d") and s.data.split is None and s.data.preset == "gqa"
    # scenarios without a preset keep the hash they had before source hf existed
    plain = parse_scenario({"compressors": ["none"], "budgets": [16], "attacks": []})
    assert "preset" not in json.dumps({k: v for k, v in plain.to_dict()["data"].items() if v is not None})


def test_task_items_prompts_scores_and_fingerprint(textvqa):
    task = Task(hf_scenario(textvqa, "textvqa").data, 3)
    item = task.items[1]
    assert item.id == "2" and item.prompt == "what colour?" + SHORT_ANSWER and item.answer == "blue"
    assert item.qtype == "textvqa" and item.source.is_file()
    assert task.score(item, "red") == pytest.approx(vqa_accuracy("red", item.answers)) == pytest.approx(0.6)
    assert task.correct(item, "red") and not task.correct(item, "green") and task.score(item, "Blue.") == 1.0
    assert task.record_fields(item, "red") == {"score": pytest.approx(0.6), "question_id": "2"}
    first = task.fingerprint()
    assert first["rows"] and set(first["images"]) == {"1", "2", "3"}
    # the fingerprint follows the rows and the images
    other = save({"question_id": [1, 2, 3], "question": ["what is written?", "what colour?", "how many?"],
                  "image": [{"bytes": png((200, 10 * i, 10)), "path": f"{i}.png"} for i in range(3)],
                  "answers": [["stop"] * 10, ["red"] * 10, ["2"] * 10]}, textvqa.parent / "changed_rows")
    assert Task(hf_scenario(other, "textvqa").data, 3).fingerprint()["rows"] != first["rows"]
    moved = save({"question_id": [1, 2, 3], "question": ["what is written?", "what colour?", "how many?"],
                  "image": [{"bytes": png((201, 10 * i, 10)), "path": f"{i}.png"} for i in range(3)],
                  "answers": [["stop"] * 10, ["red"] * 2 + ["blue"] * 8, ["2"] * 10]}, textvqa.parent / "pixels")
    changed = Task(hf_scenario(moved, "textvqa").data, 3).fingerprint()
    assert changed["rows"] == first["rows"] and changed["images"]["1"] != first["images"]["1"]
    with pytest.raises(UserInputError, match="holds 3 items but samples is 5"):
        Task(hf_scenario(textvqa, "textvqa").data, 5)


def test_textvqa_campaign_records_score_and_views(textvqa, tiny_adapter, tmp_path):
    out = run_campaign(hf_scenario(textvqa, "textvqa"), output=tmp_path / "out", adapter=tiny_adapter, quiet=True,
                       report=True)
    records = read_records(out / "results.jsonl")
    assert records and all(0.0 <= r["score"] <= 1.0 for r in records)
    assert all(r["correct"] == (r["score"] >= 0.5) for r in records)
    assert {r["question"] for r in records} == {"what is written?", "what colour?", "how many?"}
    manifest = read_manifest(out)
    assert manifest["scenario"]["data"]["preset"] == "textvqa" and set(manifest["data"]["images"]) == {"1", "2", "3"}
    df = load_records(out)
    clean = df[(df["attack"] == "clean")]
    acc = V.accuracy(df, manifest)
    for (compressor, budget), g in clean.groupby(["compressor", "budget"]):
        assert acc.loc[compressor, budget] == pytest.approx(round(100 * g["score"].mean(), 1))
    bench = V.benchmark(df, manifest)
    assert list(bench.columns) == ["n", "score"]
    row = bench.loc[("clean", 0.0, "visionzip", 16)]
    assert row["score"] == pytest.approx(round(100 * clean[clean["compressor"] == "visionzip"]["score"].mean(), 1))
    html = (out / "report" / "report.html").read_text()
    assert "Benchmark: textvqa" in html
    # resuming the finished campaign is accepted (same rows and images)
    run_campaign(hf_scenario(textvqa, "textvqa"), output=out, adapter=tiny_adapter, quiet=True, resume=True)


def test_pope_campaign_benchmark_view_has_f1_and_yes_ratio(pope, tiny_adapter, tmp_path):
    from robustvtc.data.presets import pope_aggregate

    s = hf_scenario(pope, "pope", samples=4, attacks=[], compressors=["none"], budgets=["all"])
    out = run_campaign(s, output=tmp_path / "out", adapter=tiny_adapter, quiet=True)
    records = read_records(out / "results.jsonl")
    assert {r["category"] for r in records} == {"adversarial", "random"} and all("score" in r for r in records)
    df, manifest = load_records(out), read_manifest(out)
    bench = V.benchmark(df, manifest)
    assert list(bench.columns) == ["n", "accuracy", "precision", "recall", "f1", "yes_ratio"]
    expected = pope_aggregate([{"prediction": r["prediction"], "answers": [r["answer"]]} for r in records])
    row = bench.iloc[0]
    assert row["f1"] == pytest.approx(round(100 * expected["f1"], 1))
    assert row["yes_ratio"] == pytest.approx(round(100 * expected["yes_ratio"], 1))
    assert set(V.by_type(df, manifest).columns) == {"adversarial", "random", "all"}
