"""Benchmarks from local Hugging Face datasets (save_to_disk, parquet, arrow) with lmms-eval's prompts and each
benchmark's official metric, on tiny fixtures in each dataset's real column layout; nothing downloads."""
from __future__ import annotations

import io

import pytest

from robustvtc.data.hf import aggregate, load_hf, score
from robustvtc.data.presets import SHORT_ANSWER, gqa_exact_match, mme_label, pope_label, vqa_accuracy
from robustvtc.errors import UserInputError

datasets = pytest.importorskip("datasets")


def png(colour) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buf, format="PNG")
    return buf.getvalue()


def image_column(n):
    return [{"bytes": png((40 * i, 10, 10)), "path": f"img{i}.png"} for i in range(n)]


def write(rows: dict, where, kind: str):
    features = None
    if "image" in rows:
        features = datasets.Dataset.from_dict({k: v for k, v in rows.items() if k != "image"}).features
        features["image"] = datasets.Image()
    ds = datasets.Dataset.from_dict(rows, features=features)
    if kind == "disk":
        ds.save_to_disk(str(where))
        return where
    if kind == "dict":
        datasets.DatasetDict({"validation": ds}).save_to_disk(str(where))
        return where
    where.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(where / "validation-00000-of-00001.parquet"))
    return where


@pytest.fixture
def image_dir(tmp_path):
    return tmp_path / "cache"


def test_textvqa_from_save_to_disk(tmp_path, image_dir):
    path = write({"question_id": [34602, 34603], "question": ["what is the brand?", "what number?"],
                  "image": image_column(2), "answers": [["nokia"] * 9 + ["toshiba"], ["5"] * 10],
                  "ocr_tokens": [["nokia"], ["5"]]}, tmp_path / "textvqa", "disk")
    items = load_hf(path, "textvqa", image_dir=image_dir)
    assert [i.id for i in items] == ["34602", "34603"]
    assert items[0].prompt == "what is the brand?" + SHORT_ANSWER and SHORT_ANSWER == (
        "\nAnswer the question using a single word or phrase.")
    assert items[0].image.is_file() and items[0].image.parent == image_dir and len(items[0].answers) == 10
    assert score("textvqa", "Nokia.", items[0]) == pytest.approx(1.0)
    assert score("textvqa", "toshiba", items[0]) == pytest.approx(0.3)  # 1/3 in the 9 subsets with it, 0 without
    assert load_hf(path, "textvqa", samples=1, image_dir=image_dir)[0].image == items[0].image  # content-addressed


def test_vqav2_from_parquet_with_answer_dicts(tmp_path, image_dir):
    answers = [[{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in
                enumerate(["2"] * 2 + ["two"] + ["3"] * 7)]]
    path = write({"question_id": [262148000], "question": ["How many dogs?"], "image": image_column(1),
                  "answers": answers, "multiple_choice_answer": ["3"], "answer_type": ["number"]},
                 tmp_path / "vqav2", "parquet")
    item = load_hf(path, "vqav2", image_dir=image_dir)[0]
    assert item.answers == ("2", "2", "two") + ("3",) * 7
    # leave-one-out: dropping one of the three "2"s leaves 2 matches (2/3), dropping a "3" leaves 3 (1)
    assert score("vqav2", "2", item) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert score("vqav2", "three", item) == pytest.approx(1.0)


def test_gqa_instructions_with_an_images_folder(tmp_path, image_dir):
    from PIL import Image

    images = tmp_path / "gqa_images"
    images.mkdir()
    Image.new("RGB", (20, 20), "red").save(images / "n161313.jpg")
    path = write({"id": ["201307251"], "imageId": ["n161313"], "question": ["Is it red?"], "answer": ["yes"],
                  "fullAnswer": ["Yes, it is red."]}, tmp_path / "gqa", "dict")
    with pytest.raises(UserInputError, match="no image"):
        load_hf(path, "gqa", split="validation", image_dir=image_dir)
    item = load_hf(path, "gqa", split="validation", image_root=images, image_dir=image_dir)[0]
    assert item.image == images / "n161313.jpg" and item.answers == ("yes",)
    assert gqa_exact_match("Yes.", ["yes"]) == 1.0 and gqa_exact_match("yes it is", ["yes"]) == 0.0


def test_pope_metrics(tmp_path, image_dir):
    path = write({"question_id": ["1", "2", "3", "4", "5"], "question": ["Is there a dog in the image?"] * 5,
                  "answer": ["yes", "no", "yes", "no", "yes"], "image": image_column(5),
                  "image_source": ["COCO_val2014_000000310196"] * 5, "category": ["adversarial"] * 5},
                 tmp_path / "pope", "parquet")
    items = load_hf(path, "pope", image_dir=image_dir)
    preds = ["Yes, there is a dog.", "No.", "There is not a dog", "yes", "Yes"]
    assert [pope_label(p) for p in preds] == ["yes", "no", "no", "yes", "yes"]
    records = [{"prediction": p, "answers": i.answers, "score": score("pope", p, i)} for p, i in zip(preds, items)]
    assert [r["score"] for r in records] == [1.0, 1.0, 0.0, 0.0, 1.0]
    out = aggregate("pope", records)
    assert out["accuracy"] == pytest.approx(0.6) and out["precision"] == pytest.approx(2 / 3)
    assert out["recall"] == pytest.approx(2 / 3) and out["f1"] == pytest.approx(2 / 3)
    assert out["yes_ratio"] == pytest.approx(0.6)


def test_mme_scores(tmp_path, image_dir):
    qid = ["existence/000000006040.jpg"] * 2 + ["existence/000000018150.jpg"] * 2 + ["code_reasoning/0020.png"] * 2
    path = write({"question_id": qid, "question": ["Is there a train? Please answer yes or no."] * 6,
                  "answer": ["Yes", "No", "Yes", "No", "No", "Yes"], "image": image_column(6),
                  "category": ["existence"] * 4 + ["code_reasoning"] * 2}, tmp_path / "mme", "disk")
    items = load_hf(path, "mme", image_dir=image_dir)
    assert items[0].prompt == "Is there a train?" + SHORT_ANSWER and len({i.id for i in items}) == 6
    assert [mme_label(p) for p in ("Yes.", "n", "No, it is not", "maybe")] == ["yes", "no", "no", "other"]
    preds = ["Yes", "No", "Yes", "Yes", "Yes", "No"]
    records = [{"prediction": p, "answers": i.answers, "score": score("mme", p, i), **i.meta}
               for p, i in zip(preds, items)]
    out = aggregate("mme", records)
    # existence: image 1 both right (100 + 100), image 2 one right (50 + 0) -> 125; code_reasoning: 0
    assert out["categories"] == {"existence": 125.0, "code_reasoning": 0.0}
    assert out["perception"] == 125.0 and out["cognition"] == 0.0


def test_bad_inputs_are_one_line(tmp_path, image_dir):
    with pytest.raises(UserInputError, match="unknown data.preset 'okvqa'; accepted: textvqa, vqav2, gqa, pope, mme"):
        load_hf(tmp_path, "okvqa")
    with pytest.raises(UserInputError, match="data.path not found"):
        load_hf(tmp_path / "nope", "pope")
    path = write({"question": ["q"], "label": ["yes"], "image": image_column(1)}, tmp_path / "p", "parquet")
    with pytest.raises(UserInputError, match="lacks column 'answer' of preset pope; columns: question, label, image"):
        load_hf(path, "pope", image_dir=image_dir)
    assert vqa_accuracy("x", ["x"]) == 1.0
