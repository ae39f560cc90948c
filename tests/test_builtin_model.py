"""The shipped built-in model: loads offline through from_pretrained, and its accuracy does not regress.

The floors are regression guards set below the measured figures of the shipped weights (README): a broken
loader, tokenizer or prompt drops accuracy to about 1/17 (uniform over the candidate answers).
"""
import torch

from robustvtc.campaign import Campaign, parse_scenario
from robustvtc.campaign.metrics import frame
from robustvtc.campaign.views import accuracy
from robustvtc.models.builtin import BUILTIN_DIR


def test_shipped_files_are_small_safetensors():
    size = (BUILTIN_DIR / "model.safetensors").stat().st_size
    assert size <= 10 * 1024 * 1024
    assert (BUILTIN_DIR / "tokenizer.json").is_file() and (BUILTIN_DIR / "preprocessor_config.json").is_file()


def test_builtin_is_a_real_llava_with_144_tokens(builtin_adapter):
    from transformers import LlavaForConditionalGeneration

    assert isinstance(builtin_adapter.model, LlavaForConditionalGeneration)
    assert builtin_adapter.num_visual_tokens == 144 and builtin_adapter.image_size == 96


def clean_records(adapter, compressors, budgets, samples):
    """The clean units of a campaign without attacks: the engine behind every accuracy figure."""
    scenario = parse_scenario({"compressors": compressors, "budgets": budgets, "attacks": [], "samples": samples,
                               "batch_size": 50})
    campaign = Campaign(scenario, adapter)
    return frame([r for unit in campaign.units() for r in campaign.run_unit(unit)])


def test_accuracy_floor_on_a_fixed_test_subset(builtin_adapter):
    records = clean_records(builtin_adapter, ["fastervlm", "random"], [16, 48], samples=100)
    table = accuracy(records)
    assert table.loc["none", 144] >= 90.0  # measured 98.0 on these 100 samples
    assert table.loc["fastervlm", 48] >= 90.0  # measured 98.0
    # compression behaves as in real LVLMs: random selection at 16 tokens loses what CLS attention keeps
    assert table.loc["fastervlm", 16] - table.loc["random", 16] >= 30.0  # measured 90.0 - 47.0
    # the same records twice: evaluation is deterministic
    again = clean_records(builtin_adapter, ["none"], ["all"], samples=20)
    first = records[records.compressor == "none"].set_index("sample").loc[again["sample"], "prediction"]
    assert first.tolist() == again["prediction"].tolist()


def test_gradient_reaches_pixels_of_the_shipped_model(builtin_adapter):
    from robustvtc.data.synthetic import generate_dataset, to_pixels
    from robustvtc.target import Target

    s = generate_dataset(2, "test")
    px = to_pixels(s).requires_grad_(True)
    Target(builtin_adapter, "visionzip", 16).answer_loss(px, [x.question for x in s], [x.answer for x in s]).sum().backward()
    assert torch.isfinite(px.grad).all() and px.grad.abs().sum() > 0
