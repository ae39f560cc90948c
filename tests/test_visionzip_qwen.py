"""VisionZip's official CLS-free port (Qwen2.5-VL, dvlab-research/VisionZip @ 68993a3,
``Qwen2_5_VL/qwen2_5vl_visionzip.py``) re-stated operation by operation on hand-built tensors and compared with
``visionzip_qwen`` + :meth:`VisualTokens.received_attention`; the Qwen adapters' captured signals against the
tiny models' own last block; CAGE and known_budget with ``score="received"``."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from robustvtc.compression import check_compatible, compatible_compressors, get_compressor
from robustvtc.errors import UserInputError
from robustvtc.models.base import LayerSignals, VisualTokens


# ------------------------------------------------------------------ the port, re-stated (batch size 1)
def official_scores(q, k, window_index):
    """Qwen2_5_VisionTransformerPretrainedModel.forward's tail: q, k (H, T, d) in window order."""
    attn = F.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)  # the FA2 path's recomputation
    reverse = torch.argsort(window_index)
    attn_mean = attn.mean(dim=0)
    attn_mean = attn_mean.sum(dim=0)
    attn_mean = attn_mean.view(attn_mean.shape[0] // 4, -1).mean(dim=-1)
    attn_mean = attn_mean[reverse]
    key = k.view(k.shape[0], k.shape[1] // 4, 4, k.shape[-1]).mean(dim=2)
    key = key[:, reverse, :].mean(dim=0).unsqueeze(0)
    return attn_mean, key


def official_select(attn_logits, attn_key, embeds, dominant_num, contextual_num):
    """Qwen2_5_VLForConditionalGeneration.forward's selection on the image's embeddings (N, D): the kept
    sequence (raster order, contextual tokens at their targets' places) and the kept positions."""
    _, topk_indices = torch.topk(attn_logits, dominant_num)
    mask = torch.zeros_like(attn_logits, dtype=torch.bool)
    mask[topk_indices] = True
    contextual_mask = ~mask
    metric_filtered = attn_key[:, contextual_mask]
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[1] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]
    keep = ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)
    tokens_to_merge = metric_normalized[:, keep, :]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(tokens_to_merge.shape[0], tokens_to_merge.shape[1], contextual_num)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    select_mask = torch.zeros_like(attn_logits, dtype=torch.bool)
    select_mask[topk_indices] = True
    false_pos = (~select_mask).nonzero(as_tuple=True)[0]
    select_mask[false_pos[target_indices]] = True
    inputs = embeds.unsqueeze(0).clone()
    filtered = inputs[:, contextual_mask]
    to_merge = filtered[:, keep, :]
    aggregated = torch.bmm(assign_one_hot.transpose(1, 2), to_merge) / counts
    inputs[:, false_pos[target_indices]] = filtered[:, target_indices, :] + aggregated
    return inputs[0, select_mask], select_mask.nonzero(as_tuple=True)[0]


def hand_built(seed=0, heads=3, grid=(6, 8), d=5, dim=7):
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    q, k = torch.randn(heads, 4 * n, d, generator=g), torch.randn(heads, 4 * n, d, generator=g)
    window_index = torch.randperm(n, generator=g)
    embeds = torch.randn(n, dim, generator=g)
    return q, k, window_index, embeds


def tokens_from(q, k, window_index, embeds, grid):
    """What the adapter hands over: q, k per token group in raster order of merged tokens."""
    back = torch.argsort(window_index)
    h, t, d = q.shape
    qr = q.view(h, t // 4, 4, d)[:, back].reshape(h, t, d)
    kr = k.view(h, t // 4, 4, d)[:, back].reshape(h, t, d)
    return VisualTokens(embeds.unsqueeze(0), None, grid, 0, {0: LayerSignals(qr[None], kr[None], d ** -0.5)}, 1,
                        patch_group=4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_and_keys_equal_the_port(seed):
    q, k, window_index, embeds = hand_built(seed)
    tokens = tokens_from(q, k, window_index, embeds, (6, 8))
    scores, key = official_scores(q, k, window_index)
    torch.testing.assert_close(tokens.received_attention()[0], scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens.keys(None, reduce="mean"), key, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("seed,fraction", [(0, 0.65), (1, 0.45), (2, 0.65)])
def test_kept_sequence_equals_the_port(seed, fraction):
    """The port's settings: 65 % + 5 % and 45 % + 5 % of the N merged tokens."""
    q, k, window_index, embeds = hand_built(seed, grid=(8, 10))
    n = embeds.shape[0]
    dominant, contextual = int(fraction * n), max(int(0.05 * n), 1)
    scores, key = official_scores(q, k, window_index)
    expected, positions = official_select(scores, key, embeds, dominant, contextual)
    tokens = tokens_from(q, k, window_index, embeds, (8, 10))
    comp = get_compressor("visionzip_qwen")
    assert comp.split_for(dominant + contextual, n) == (dominant, contextual)
    plan = comp.plan(tokens, dominant + contextual)
    kept = plan.weights[0] @ tokens.sources()[0]
    torch.testing.assert_close(kept, expected, atol=1e-5, rtol=1e-5)
    # positions: each kept token at its (main) source, in raster order
    single = plan.weights[0, :, :n].gt(0).sum(-1) == 2  # contextual tokens with one member: a weight tie
    assert torch.equal(plan.primary_sources()[0][~single], positions[~single])


def test_received_attention_refuses_cls_encoders(tiny_adapter):
    tokens = tiny_adapter.encode(torch.rand(1, 3, *tiny_adapter.input_size))
    with pytest.raises(UserInputError, match="received attention is VisionZip's score for single-crop encoders"):
        tokens.received_attention()
    assert "visionzip_qwen" not in compatible_compressors(tiny_adapter)
    with pytest.raises(UserInputError, match=r"compressor 'visionzip_qwen' needs the queries and keys of its vision "
                                             r"encoder's last layer .* compatible compressors: .*visionzip"):
        check_compatible(tiny_adapter, get_compressor("visionzip_qwen"), 16)


# ------------------------------------------------------------------ the tiny Qwen models' own last block
@pytest.fixture(scope="module")
def qwen():
    from robustvtc.models.qwen2_vl import Qwen25VLAdapter, Qwen2VLAdapter

    from test_real_adapters import tiny_model

    out = {}
    for family, cls in (("qwen2_vl", Qwen2VLAdapter), ("qwen2_5_vl", Qwen25VLAdapter)):
        torch.manual_seed(0)
        model, tok = tiny_model(family)
        out[family] = cls(model.eval(), tok, image_size=32)
    return out


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_adapter_signals_are_the_last_blocks(qwen, family):
    """q/k recomputed from the last block's own input (window order) and scored the port's way, per image."""
    import importlib

    a = qwen[family]
    visual = a.model.model.visual
    attn = visual.blocks[-1].attn
    seen = {}
    hook = attn.register_forward_pre_hook(lambda m, args, kw: seen.update(x=args[0] if args else kw["hidden_states"],
                                                                          kw=kw), with_kwargs=True)
    px = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    try:
        tokens = a.encode(px)
    finally:
        hook.remove()
    assert "received_attention" in a.capabilities and "visionzip_qwen" in compatible_compressors(a)
    rope = importlib.import_module(type(attn).__module__).apply_rotary_pos_emb_vision
    t = seen["x"].shape[0] // 2
    q, k, _ = attn.qkv(seen["x"]).reshape(2 * t, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = rope(q, k, *seen["kw"]["position_embeddings"])
    thw = torch.tensor([[1, a.grid[0] * 2, a.grid[1] * 2]])
    window = a._window_index(thw) if family == "qwen2_5_vl" else torch.arange(a.num_visual_tokens)
    if family == "qwen2_5_vl":
        assert not torch.equal(window, torch.arange(a.num_visual_tokens))  # the windows do reorder
    received = tokens.received_attention()
    for b in range(2):
        qb, kb = q[b * t:(b + 1) * t].transpose(0, 1), k[b * t:(b + 1) * t].transpose(0, 1)
        scores, key = official_scores(qb.detach(), kb.detach(), window)
        torch.testing.assert_close(received[b].detach(), scores, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tokens.keys(None, "mean")[b:b + 1].detach(), key, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_cage_and_known_budget_take_the_received_score(qwen, family):
    from robustvtc.attacks import ATTACKS
    from robustvtc.attacks.base import importance
    from robustvtc.target import Target

    a = qwen[family]
    px = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    tokens = a.encode(px)
    torch.testing.assert_close(importance(tokens, "received"), tokens.received_attention().float())
    target = Target(a, "visionzip_qwen", 10)
    assert target.budget_mapping()["contextual"] == 1 and target.budget_mapping()["dominant"] == 9
    for name, kwargs in (("cage", {"k_min": 2, "k_max": 8}), ("known_budget", {"budget": 10})):
        attack = ATTACKS.get(name)(target, score="received", steps=2, eps=4 / 255, random_start=True, **kwargs)
        result = attack(px, ["what color is the circle ?"], ["red"])
        adv = result.adv
        assert adv.shape == px.shape and (adv - px).abs().max() <= 4 / 255 + 1e-6 and (adv != px).any(), name
        assert torch.isfinite(result.loss_trace).all() and result.loss_trace.abs().sum() > 0, name
    # the received score is differentiable w.r.t. the pixels (rank distortion reaches the encoder)
    px = px.clone().requires_grad_()
    importance(a.encode(px), "received").std().backward()
    assert px.grad is not None and px.grad.abs().sum() > 0
