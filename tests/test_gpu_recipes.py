"""The GPU recipes in docs/recipes/ (one scenario per model family, docs/gpu-recipes.md) validate offline without
their checkpoints: ``robustvtc validate`` reads the YAML and at most the model's config -- never the weights --
and a hub id missing from the cache leaves the budgets to be checked when the model loads."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from robustvtc.campaign import load_scenario
from robustvtc.campaign.plan import check_against_model_config, visual_tokens_from_config
from robustvtc.cli import main
from robustvtc.compression import COMPRESSORS

RECIPES = sorted((Path(__file__).resolve().parent.parent / "docs" / "recipes").glob("*.yaml"))
FAMILIES = {"llava15": "llava", "llava_next": "llava_next", "qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl",
            "internvl3_5": "internvl", "llava_onevision": "llava_onevision", "gemma3": "gemma3"}
# what each family's adapter offers (robustvtc.models: LlavaAdapter with CLIP, LlavaNextAdapter, Qwen2.5-VL,
# Qwen3-VL, InternVL, OneVision with SigLIP, Gemma 3) -- a recipe lists only compressors its model runs
CAPABILITIES = {"llava": {"cls_token", "encoder_rerun"}, "llava_next": {"cls_token"},
                "qwen2_5_vl": {"received_attention"}, "qwen3_vl": set(), "internvl": set(), "llava_onevision": set(),
                "gemma3": set()}
IN_ENCODER_ONE_CROP = {"llava_next"}  # tome / flowcut act inside one crop's encoder


def test_one_recipe_per_family():
    assert {p.stem for p in RECIPES} == set(FAMILIES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_validate_reads_no_weights(path, monkeypatch):
    import robustvtc.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("validate loaded a model")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{path}: ok -- ")
    s = load_scenario(path)
    assert s.device == "cuda" and s.dtype in ("bf16", "bfloat16") and s.data.source == "hf" and s.data.preset
    # not in this machine's cache: the budgets wait for the model (no download, no error)
    assert visual_tokens_from_config(s.model) is None and check_against_model_config(s) is None


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipes_list_only_compressors_their_family_runs(path):
    family = FAMILIES[path.stem]
    s = load_scenario(path)
    for name in s.compressors:
        cls = COMPRESSORS.get(name)
        assert set(cls.requires) <= CAPABILITIES[family], (family, name)
        assert not (family in IN_ENCODER_ONE_CROP and cls.stage == "in_encoder"), (family, name)
    if family == "qwen2_5_vl":
        assert "visionzip_qwen" in s.compressors


def test_validate_checks_budgets_against_a_readable_config(tmp_path):
    """Where the config is on disk (a local checkpoint), validate reads it -- and only it -- for the budgets."""
    import transformers as T

    vision = T.CLIPVisionConfig(image_size=336, patch_size=14, num_hidden_layers=1, hidden_size=8,
                                intermediate_size=8, num_attention_heads=1)
    T.LlavaConfig(vision_config=vision, text_config=T.LlamaConfig(num_hidden_layers=1, hidden_size=8,
                                                                   intermediate_size=8, num_attention_heads=1)
                  ).save_pretrained(tmp_path / "llava")
    recipe = RECIPES[[p.stem for p in RECIPES].index("llava15")]
    ok = CliRunner().invoke(main, ["validate", str(recipe), "--set", f"model={tmp_path / 'llava'}"])
    assert ok.exit_code == 0 and "(576 visual tokens)" in ok.output, ok.output
    bad = CliRunner().invoke(main, ["validate", str(recipe), "--set", f"model={tmp_path / 'llava'}",
                                    "--set", "budgets=[192, 600]"])
    assert bad.exit_code != 0 and "budgets[1]: 600 exceeds the 576 visual tokens" in bad.output


@pytest.mark.parametrize("recipe,tokens", [("gemma3", 256), ("internvl3_5", 256)])
def test_validate_reads_fixed_token_counts_of_gemma3_and_internvl(tmp_path, recipe, tokens):
    """Gemma 3 (its projector's mm_tokens_per_image) and InternVL (one 448 tile, pixel shuffle 0.5) have a fixed
    token count in their config: validate checks the budgets against it, as for LLaVA."""
    import transformers as T

    text = dict(num_hidden_layers=1, hidden_size=8, intermediate_size=8, num_attention_heads=1, num_key_value_heads=1)
    if recipe == "gemma3":
        config = T.Gemma3Config(text_config=T.Gemma3TextConfig(**text, head_dim=8))  # the released 896 px, 256 tokens
    else:
        vision = T.InternVLVisionConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=8, num_attention_heads=1,
                                        image_size=[448, 448], patch_size=[14, 14])
        config = T.InternVLConfig(vision_config=vision, text_config=T.Qwen2Config(**text), downsample_ratio=0.5)
    config.save_pretrained(tmp_path / recipe)
    path = RECIPES[[p.stem for p in RECIPES].index(recipe)]
    ok = CliRunner().invoke(main, ["validate", str(path), "--set", f"model={tmp_path / recipe}"])
    assert ok.exit_code == 0 and f"({tokens} visual tokens)" in ok.output, ok.output
    bad = CliRunner().invoke(main, ["validate", str(path), "--set", f"model={tmp_path / recipe}",
                                    "--set", f"budgets=[16, {tokens + 1}]"])
    assert bad.exit_code == 2 and f"budgets[1]: {tokens + 1} exceeds the {tokens} visual tokens" in bad.output
