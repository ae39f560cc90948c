"""The LLaVA adapter: same numbers as transformers' own forward, differentiable, batched, strict on input."""
import numpy as np
import pytest
import torch

from robustvtc.data.synthetic import ANSWERS
from robustvtc.errors import UserInputError
from robustvtc.images import to_pixels as image_to_pixels
from robustvtc.target import Target
from test_real_adapters import eager_attentions

QUESTIONS = ["what color is the circle ?", "is the red circle left of the blue square ?"]


def test_matches_transformers_forward_with_left_padding(tiny_adapter):
    a = tiny_adapter
    torch.manual_seed(0)
    px = torch.rand(2, 3, 96, 96)
    ours = a.candidate_logprobs(a.project(a.encode(px).features), QUESTIONS, ["yes", "no", "red"])
    for b, q in enumerate(QUESTIONS):
        text = a.prompt_template.format(question=q).replace("<image>", "<image>" * a.num_visual_tokens)
        ids = a.tokenizer(text, return_tensors="pt").input_ids
        ref = a.model(input_ids=ids, pixel_values=a.normalize(px[b:b + 1])).logits[0, -1].log_softmax(-1)
        cand = [a.continuation_ids(q, c)[0] for c in ["yes", "no", "red"]]
        torch.testing.assert_close(ours[b], ref[cand], atol=1e-5, rtol=1e-5)


def test_cls_attention_matches_eager_attention_maps(tiny_adapter):
    a = tiny_adapter
    px = torch.rand(2, 3, 96, 96)
    tokens = a.encode(px)
    attentions = eager_attentions(a.model.model.vision_tower, pixel_values=a.normalize(px))
    ref = attentions[a.feature_layer][:, :, 0, 1:]
    torch.testing.assert_close(tokens.cls_attention(reduce="none"), ref, atol=1e-6, rtol=1e-5)
    assert tokens.num_tokens == 144 and tokens.grid == (12, 12)
    assert a.feature_layer == 2  # vision_feature_layer = -2 of a 4-layer tower


def test_gradient_reaches_pixels_through_compressed_path(tiny_adapter):
    px = torch.rand(2, 3, 96, 96, requires_grad=True)
    target = Target(tiny_adapter, "fastervlm", 16)
    loss = target.answer_loss(px, QUESTIONS, ["red", "yes"]).sum()
    loss.backward()
    assert px.grad is not None and px.grad.abs().sum() > 0
    # CLS attention itself is differentiable too (CAGE's rank-distortion term needs it)
    px2 = torch.rand(1, 3, 96, 96, requires_grad=True)
    tiny_adapter.encode(px2).cls_attention().sum().backward()
    assert px2.grad.abs().sum() > 0


@pytest.mark.parametrize("compressor,budget", [("none", None), ("fastervlm", 16), ("fastervlm", 48), ("random", 32)])
def test_budget_is_exact(tiny_adapter, compressor, budget):
    fwd = Target(tiny_adapter, compressor, budget).forward(torch.rand(3, 3, 96, 96))
    expected = budget or tiny_adapter.num_visual_tokens
    assert fwd.embeds.shape[:2] == (3, expected)
    assert fwd.plan.kept_patch_mask().sum(-1).tolist() == [expected] * 3


def test_batch_equals_single(tiny_adapter):
    px = torch.rand(2, 3, 96, 96)
    t = Target(tiny_adapter, "fastervlm", 32)
    both = t.candidate_logprobs(px, QUESTIONS, ANSWERS)
    for b in range(2):
        single = t.candidate_logprobs(px[b:b + 1], QUESTIONS[b:b + 1], ANSWERS)
        torch.testing.assert_close(both[b], single[0], atol=1e-5, rtol=1e-4)


def test_same_seed_same_random_selection(tiny_adapter):
    px = torch.rand(2, 3, 96, 96)
    a = Target(tiny_adapter, "random", 16, seed=3).forward(px).plan.primary_sources()
    b = Target(tiny_adapter, "random", 16, seed=3).forward(px).plan.primary_sources()
    c = Target(tiny_adapter, "random", 16, seed=4).forward(px).plan.primary_sources()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_multi_token_answers_score_by_teacher_forcing(tiny_adapter):
    a = tiny_adapter
    emb = a.project(a.encode(torch.rand(1, 3, 96, 96)).features)
    q = [QUESTIONS[0]]
    two = a.sequence_logprob(emb, q, ["red circle"])
    red = a.sequence_logprob(emb, q, ["red"])
    assert two.item() < red.item()  # one more token can only lower the summed log-probability
    scores = a.candidate_logprobs(emb, q, ["red", "red circle"])
    torch.testing.assert_close(scores[0], torch.stack([red[0], two[0]]), atol=1e-5, rtol=1e-5)


def test_generate_returns_strings(tiny_adapter):
    a = tiny_adapter
    emb = a.project(a.encode(torch.rand(2, 3, 96, 96)).features)
    out = a.generate(emb, QUESTIONS, max_new_tokens=2)
    assert len(out) == 2 and all(isinstance(x, str) for x in out)


@pytest.mark.parametrize("bad,match", [
    (np.zeros((96, 96, 3), np.uint8), "torch tensor"),
    (torch.rand(1, 3, 64, 64), "does not match the model's input resolution"),
    (torch.rand(1, 4, 96, 96), r"shape \(B, 3, 96, 96\)"),
    (torch.full((1, 3, 96, 96), float("nan")), "NaN"),
    (torch.rand(1, 3, 96, 96) * 255, r"\[0, 1\]"),
    (torch.zeros(1, 3, 96, 96, dtype=torch.uint8), "floating"),
])
def test_bad_pixels_are_refused(tiny_adapter, bad, match):
    with pytest.raises(UserInputError, match=match):
        tiny_adapter.encode(bad)


def test_image_conversion_errors(tmp_path):
    from PIL import Image

    assert image_to_pixels(Image.new("L", (96, 96)), 96).shape == (1, 3, 96, 96)  # grey is converted (images.py)
    with pytest.raises(UserInputError, match=r"image array is empty \(shape \(0, 96, 3\)\)"):
        image_to_pixels(np.zeros((0, 96, 3), np.uint8), 96)
    with pytest.raises(UserInputError, match="not an image"):
        image_to_pixels(42, 96)
    with pytest.raises(UserInputError, match="not found"):
        image_to_pixels(tmp_path / "missing.png", 96)
    (tmp_path / "x.png").write_text("not a png")
    with pytest.raises(UserInputError, match="not an image file"):
        image_to_pixels(tmp_path / "x.png", 96)
    Image.new("RGB", (128, 128), (255, 0, 0)).save(tmp_path / "red.png")
    with pytest.raises(UserInputError, match="resolution"):
        image_to_pixels(tmp_path / "red.png", 96)
    px = image_to_pixels(tmp_path / "red.png", 96, resize=True)
    assert px.shape == (1, 3, 96, 96) and abs(px[0, 0].mean().item() - 1) < 1e-3


@pytest.mark.parametrize("compressor,budget,match", [
    ("fastervlm", 0, "out of range"), ("fastervlm", 145, "out of range"), ("random", -3, "out of range"),
    ("none", 16, "keeps all 144"), ("fastervlm", 2.5, "integer"), ("nope", 16, "accepted: .*fastervlm"),
])
def test_bad_budget_or_compressor(tiny_adapter, compressor, budget, match):
    with pytest.raises(UserInputError, match=match):
        Target(tiny_adapter, compressor, budget)


def test_unknown_model_name():
    from robustvtc.models import load_model

    with pytest.raises(UserInputError, match="accepted: builtin"):
        load_model("no-such-model")
