"""The shipped builtin-deit model: a LLaVA on the real DeiT-tiny/16-224 tower, loaded by name."""
import json

import pytest
import torch

from robustvtc.compression import compatible_compressors
from robustvtc.data import synthetic as S
from robustvtc.models import list_models, load_model
from robustvtc.models.builtin import BUILTIN_DEIT_DIR
from robustvtc.target import Target


@pytest.fixture(scope="module")
def deit():
    return load_model("builtin-deit")


def test_shipped_folder_holds_the_licence_and_half_weights():
    assert "builtin-deit" in list_models()
    assert (BUILTIN_DEIT_DIR / "LICENSE-deit-tiny-patch16-224.txt").read_text().lstrip().startswith("Apache License")
    report = json.loads((BUILTIN_DEIT_DIR / "training_report.json").read_text())
    assert report["stored"] == "float16"
    assert (BUILTIN_DEIT_DIR / "model.safetensors").stat().st_size < 16e6


def test_loads_as_a_llava_on_a_deit_tower(deit):
    assert deit.input_size == (224, 224) and deit.num_visual_tokens == 196 and deit.grid == (14, 14)
    assert type(deit.model.model.vision_tower).__name__ == "ViTModel" and deit.dtype == torch.float32
    assert {"fastervlm", "visionzip", "random"} <= set(compatible_compressors(deit))


def test_answers_the_synthetic_task(deit):
    samples = S.generate_dataset(20, "test", size=224)
    pred = Target(deit, "none").predict(S.to_pixels(samples), [s.question for s in samples], S.ANSWERS)
    assert sum(p == s.answer for p, s in zip(pred, samples)) >= 16
