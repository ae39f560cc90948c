"""builtin-deit's recipe: the synthetic task rendered natively at 224 px, the pretrained DeiT-tiny tower loaded
exactly, and a tiny run writing a folder (fp16 weights, DeiT's licence) that loads through load_model."""
import json

import numpy as np
import pytest
import torch

from robustvtc.data import synthetic as S
from robustvtc.models import load_model
from tools.builtin_deit_recipe import DEIT_DIR, DeiTTrainConfig, new_builtin_deit, train_builtin_deit
from tools.builtin_recipe import _collate_scenes, _patch_cells

pytestmark = pytest.mark.skipif(not (DEIT_DIR / "model.safetensors").is_file(), reason="DeiT-tiny weights absent")


def test_scenes_render_natively_at_224():
    small, large = S.generate_sample(7, "val"), S.generate_sample(7, "val", size=224)
    assert large.image.shape == (224, 224, 3)
    assert (large.question, large.answer, large.objects) == (small.question, small.answer, small.objects)
    up = np.asarray(torch.nn.functional.interpolate(torch.from_numpy(small.image).permute(2, 0, 1)[None].float(),
                                                    size=224, mode="nearest")[0].permute(1, 2, 0))
    assert np.abs(up - large.image).mean() > 2  # drawn at 224, not an upscaled 96 px image
    again = S.to_pixels([small], size=224)
    assert torch.equal(again, S.to_pixels([large]))
    cov = large.patch_coverage(16)
    assert cov.shape == (len(large.objects), 14, 14) and (cov.sum(axis=(1, 2)) > 0).all()


def test_object_patches_carry_their_objects_cell_at_224():
    batch = _collate_scenes([S.generate_scene(i, size=224) for i in range(3)], 16)
    on = batch["patch_shape"] > 0
    assert on.any() and batch["patch_cell"].shape == (3, 196)
    assert torch.equal(_patch_cells(), _patch_cells(96, 8))


def test_tower_is_deit_tiny_unchanged():
    from transformers import ViTForImageClassification

    a = new_builtin_deit()
    ref = ViTForImageClassification.from_pretrained(str(DEIT_DIR)).vit
    px = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        want = ref(pixel_values=a.normalize(px), output_hidden_states=True).hidden_states[6][:, 1:]
        torch.testing.assert_close(a.encode(px).features, want)
    assert a.capabilities == {"cls_token"} and a.num_visual_tokens == 196
    assert a.feature_layer == 5  # vision_feature_layer -7: the output of DeiT's 6th of 12 layers


def test_tiny_run_writes_a_loadable_half_precision_model(tmp_path):
    cfg = DeiTTrainConfig(final_eval_samples=4)
    from dataclasses import replace

    cfg = replace(cfg, stage2=replace(cfg.stage2, steps=2, scenes=2, per_type=1, eval_every=2, eval_samples=4))
    report = train_builtin_deit(tmp_path, cfg, log=lambda m: None)
    assert report["stored"] == "float16" and report["config"]["stage2"]["image_size"] == 224
    assert (tmp_path / "LICENSE-deit-tiny-patch16-224.txt").read_text().startswith(
        (DEIT_DIR / "LICENSE.repo-apache-2.0.txt").read_text()[:200])
    assert json.loads((tmp_path / "config.json").read_text())["vision_config"]["model_type"] == "vit"
    a = load_model(str(tmp_path))
    assert a.input_size == (224, 224) and a.pixel_space["normalization"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert a.encode(torch.rand(1, 3, 224, 224)).features.shape == (1, 196, 192)
