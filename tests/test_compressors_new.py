"""HiPrune, VScan, FlowCut (and CDPruner's selection core): each compared with an independent re-statement of
its reference code's operations (plain torch, following the official lines), on hand-built and random inputs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from robustvtc.compression import get_compressor
from robustvtc.compression.flowcut import FlowCut, adaptive_prune_count, flow_score
from robustvtc.compression.hiprune import received_attention
from robustvtc.data.synthetic import generate_sample, to_pixels
from robustvtc.errors import UserInputError
from robustvtc.models.base import LayerSignals, VisualTokens

NUM_LAYERS, FEATURE_LAYER = 4, 2


def tokens_from(signals: dict[int, LayerSignals], grid: tuple[int, int], dim: int = 8, seed: int = 0) -> VisualTokens:
    B = next(iter(signals.values())).queries.shape[0]
    feats = torch.randn(B, grid[0] * grid[1], dim, generator=torch.Generator().manual_seed(seed))
    return VisualTokens(feats, torch.randn(B, dim), grid, FEATURE_LAYER, signals, NUM_LAYERS)


def ranked_signals(logits: torch.Tensor, heads: int = 2) -> LayerSignals:
    """Every query (CLS included) attends softmax([0, logits]) : CLS attention = received attention ranking."""
    B, N = logits.shape
    q = torch.zeros(B, heads, N + 1, 2)
    q[..., 0] = 1.0
    k = torch.zeros(B, heads, N + 1, 2)
    k[:, :, 1:, 0] = logits.unsqueeze(1)
    return LayerSignals(q, k, 1.0)


def random_signals(B: int, N: int, g: torch.Generator, heads: int = 3, d: int = 4) -> LayerSignals:
    return LayerSignals(torch.randn(B, heads, N + 1, d, generator=g), torch.randn(B, heads, N + 1, d, generator=g), 0.7)


def attention_maps(sig: LayerSignals) -> torch.Tensor:
    """(B, heads, 1 + N, 1 + N) softmax attention as CLIP's eager attention computes it."""
    return ((sig.queries * sig.scale) @ sig.keys.transpose(-1, -2)).softmax(dim=-1)


# ---------------------------------------------------------------------------------------------- HiPrune
def hiprune_reference(all_attn: dict[int, torch.Tensor], select: int, object_layer: int, retention: int,
                      alpha: float, width: int) -> list[list[int]]:
    """llava_arch.encode_images of the HiPrune reference, line by line (24 -> width, 575 -> N - 1)."""
    B, N = all_attn[select].shape[0], all_attn[select].shape[-1] - 1
    visual_token_num = retention  # int(int(HIPRUNE_RETENTION) / B) with one image per encoder call
    deep_attention = all_attn[select].mean(dim=1).mean(dim=1)[:, 1:].clone()
    shallow_attention = all_attn[object_layer - 1].mean(dim=1).mean(dim=1)[:, 1:]
    shallow_token_num = round(visual_token_num * alpha / 5)
    out = []
    for i in range(B):
        s = torch.topk(shallow_attention[i].unsqueeze(0), k=shallow_token_num, dim=1)[1]
        s = torch.cat([s, s - 1, s + 1, s - width, s + width], dim=1).clamp(0, N - 1)
        s = torch.unique(s, sorted=False).unsqueeze(0)
        deep_token_num = visual_token_num - s.shape[1]
        mask = torch.zeros(1, N, dtype=torch.bool)
        mask.scatter_(1, s, 1)
        deep_attention[i] -= mask.int().squeeze()
        d = torch.topk(deep_attention[i].unsqueeze(0), k=deep_token_num, dim=1)[1]
        out.append(torch.sort(torch.cat([s, d], dim=1), dim=1)[0][0].tolist())
    return out


def test_hiprune_anchors_buffers_registers_by_hand():
    # 6x6 grid; object layer: anchors 2 and 6 (alpha 1, budget 12 -> round(2.4) = 2 anchors)
    shallow, deep = torch.zeros(1, 36), torch.zeros(1, 36)
    shallow[0, [2, 6]] = torch.tensor([5.0, 4.0])
    deep[0, [6, 20, 30, 35, 13]] = torch.tensor([9.0, 8.0, 7.0, 6.0, 5.0])
    tokens = tokens_from({1: ranked_signals(shallow), FEATURE_LAYER: ranked_signals(deep)}, (6, 6))
    plan = get_compressor("hiprune", alpha=1.0, object_layer=2).plan(tokens, 12)
    # buffers of 2: 1, 3, 8 and 2 - 6 clamped to 0; of 6: 7, 12, 0 and 5 (the previous row's end: no wrap
    # check, as the reference); 9 anchor+buffer tokens -> 3 registers by deep attention, 6 excluded
    assert plan.primary_sources().tolist() == [[0, 1, 2, 3, 5, 6, 7, 8, 12, 20, 30, 35]]
    assert torch.equal(plan.weights.sum(-1), torch.ones(1, 12))


@pytest.mark.parametrize("alpha,budget", [(0.1, 64), (0.5, 30), (1.0, 25), (0.1, 10)])
def test_hiprune_matches_the_reference_on_random_attention(alpha, budget):
    g = torch.Generator().manual_seed(3)
    N, grid = 144, (12, 12)
    signals = {1: random_signals(2, N, g), FEATURE_LAYER: random_signals(2, N, g)}
    tokens = tokens_from(signals, grid)
    plan = get_compressor("hiprune", alpha=alpha, object_layer=2).plan(tokens, budget)
    expected = hiprune_reference({i: attention_maps(s) for i, s in signals.items()}, FEATURE_LAYER, 2, budget,
                                 alpha, 12)
    assert plan.primary_sources().tolist() == expected


def test_hiprune_received_attention_and_mapping():
    g = torch.Generator().manual_seed(4)
    sig = random_signals(1, 16, g)
    tokens = tokens_from({FEATURE_LAYER: sig}, (4, 4))
    assert torch.allclose(received_attention(tokens, None), attention_maps(sig).mean(1).mean(1)[:, 1:], atol=1e-6)
    hp = get_compressor("hiprune")
    assert hp.signal_layers() == (8,)  # HIPRUNE_OBJECT_LAYER=9 is 1-based
    assert [hp.anchors(k) for k in (192, 128, 64)] == [4, 3, 1]  # round(3.84), round(2.56), round(1.28)
    with pytest.raises(UserInputError, match="lower alpha"):
        hp2 = get_compressor("hiprune", alpha=1.0, object_layer=2)
        hp2.plan(tokens_from({1: sig, FEATURE_LAYER: sig}, (4, 4)), 3)  # 1 anchor + 4 buffers > 3


def test_hiprune_straight_through_is_exact_and_has_a_score_gradient():
    g = torch.Generator().manual_seed(5)
    sig = {1: random_signals(1, 36, g), FEATURE_LAYER: random_signals(1, 36, g)}
    for s in sig.values():
        s.keys.requires_grad_()
    tokens = tokens_from(sig, (6, 6))
    exact = get_compressor("hiprune", alpha=1.0, object_layer=2).plan(tokens, 12).weights
    st = get_compressor("hiprune", alpha=1.0, object_layer=2, relaxation="straight_through").plan(tokens, 12).weights
    assert torch.equal(st, exact)
    grads = torch.autograd.grad(st.sum(), [s.keys for s in sig.values()])
    assert all(gr.abs().sum() > 0 for gr in grads)  # anchors (object layer) and registers (feature layer)


# ---------------------------------------------------------------------------------------------- VScan
def vscan_reference(attn: dict[int, torch.Tensor], shallow_layer: int, deep_layer: int, visual_token_num: int,
                    features: torch.Tensor, side: int, window_size: int = 6) -> tuple[list[list[int]], torch.Tensor]:
    """VScan's encode_images / window_cls_selection / token_merging (24 -> side), line by line; ``features``
    are the projected features. Returns the retained indices and the merged retained features."""
    image_attentions = {i: a[:, :, 0, 1:].mean(dim=1) for i, a in attn.items()}  # CLS row, head mean
    B, N = image_attentions[deep_layer].shape
    shallow = image_attentions[shallow_layer]
    deep = image_attentions[deep_layer].clone()
    local_ratio = 1 - 0.5
    n_local = int(visual_token_num * local_ratio)
    H = W = side
    attn_map = shallow.view(B, H, W)
    total_windows = (H // window_size) * (W // window_size)
    k = n_local // total_windows
    local_indices = []
    for b in range(B):
        indices_b = []
        for i in range(H // window_size):
            for j in range(W // window_size):
                window = attn_map[b, i * window_size:(i + 1) * window_size, j * window_size:(j + 1) * window_size]
                _, topk_indices = torch.topk(window.reshape(-1), k)
                for idx in topk_indices:
                    dy, dx = divmod(idx.item(), window_size)
                    indices_b.append((i * window_size + dy) * W + j * window_size + dx)
        local_indices.append(indices_b)
    local_indices = torch.tensor(local_indices)
    for b in range(B):
        deep[b, local_indices[b]] = 0
    global_indices = torch.topk(deep, k=visual_token_num - n_local, dim=1)[1]
    token_indices = torch.cat((local_indices, global_indices), dim=1)
    index_mask = torch.zeros(B, N, dtype=torch.bool)
    index_mask.scatter_(1, token_indices, True)
    # token_merging(scaling=1)
    retained = torch.stack([features[b][index_mask[b]] for b in range(B)])
    others = torch.stack([features[b][~index_mask[b]] for b in range(B)])
    T = retained.shape[1]
    nearest = F.cosine_similarity(others.unsqueeze(2), retained.unsqueeze(1), dim=3).argmax(dim=2)
    merge_count = torch.zeros(B, T, dtype=torch.int)
    merged = torch.zeros_like(retained) + retained * 1
    merged.scatter_add_(1, nearest.unsqueeze(-1).expand(-1, -1, features.shape[-1]), others)
    merge_count.scatter_add_(1, nearest, torch.ones_like(nearest, dtype=merge_count.dtype))
    merged /= (1 + merge_count.unsqueeze(2))
    kept = [index_mask[b].nonzero().flatten().tolist() for b in range(B)]
    return kept, merged


def test_vscan_local_windows_global_top_and_merge_by_hand():
    # 6x6 grid, 3x3 windows (4 windows); budget 8 -> V = 8: 1 local per window + 4 global
    shallow, deep = torch.zeros(1, 36), torch.zeros(1, 36)
    shallow[0, [7, 4, 25, 35]] = 3.0  # one peak per window
    shallow[0, [0, 5]] = 2.0  # runners-up in windows 0 and 1
    deep[0, [7, 0, 20, 21, 33, 34]] = torch.tensor([9.0, 8.0, 7.0, 6.0, 5.0, 4.0])  # 7 is local: zeroed
    tokens = tokens_from({1: ranked_signals(shallow), FEATURE_LAYER: ranked_signals(deep)}, (6, 6))
    vs = get_compressor("vscan", window=3, shallow_layer=1)
    assert vs.budget_mapping(8, 36) == {"budget": 8, "global_ratio": 0.5, "window": 3, "shallow_layer": 1,
                                        "llm_stage": "not run (layer_list None)", "visual_token_num": 8,
                                        "local": 4, "global": 4}
    kept = [0, 4, 7, 20, 21, 25, 33, 35]
    # projected features: retained token r is e_r; every other patch j is closest to retained slot j % 8
    proj = torch.zeros(1, 37, 8)
    for r, t in enumerate(kept):
        proj[0, t, r] = 1.0
    others = [j for j in range(36) if j not in kept]
    for j in others:
        proj[0, j, j % 8] = 1.0
        proj[0, j, (j + 1) % 8] = 0.5
    w = vs.plan(tokens, 8, projected=proj).weights[0]
    for r, t in enumerate(kept):
        members = [j for j in others if j % 8 == r]
        expected = torch.zeros(37)
        expected[[t] + members] = 1 / (1 + len(members))
        assert torch.allclose(w[r], expected)


def test_vscan_budget_maps_to_the_reference_visual_token_num():
    vs = get_compressor("vscan")
    for k in (64, 96, 128, 192):  # the paper's settings keep exactly V on 24x24
        assert vs.visual_token_num(k, (24, 24)) == k
    assert vs.visual_token_num(100, (24, 24)) == 103  # V=103: 16 * (51 // 16) + 103 - 51 = 100
    assert vs.kept_count(100, 16) == 98
    with pytest.raises(UserInputError, match="nearest accepted budgets: 80, 96"):
        vs.check_budget(90, 576)  # 32q + 17 .. 32q + 31 are never kept
    assert vs.visual_token_num(36, (12, 12)) == 39  # the tiny model's grid: 4 windows
    assert vs.visual_token_num(576, (24, 24)) == 576


@pytest.mark.parametrize("budget", [36, 64, 9])
def test_vscan_matches_the_reference_on_random_inputs(budget):
    g = torch.Generator().manual_seed(6)
    N, side = 144, 12
    signals = {1: random_signals(2, N, g), FEATURE_LAYER: random_signals(2, N, g)}
    tokens = tokens_from(signals, (side, side))
    proj = torch.randn(2, N + 1, 5, generator=g)
    vs = get_compressor("vscan", shallow_layer=1)
    v = vs.visual_token_num(budget, (side, side))
    plan = vs.plan(tokens, budget, projected=proj)
    kept, merged = vscan_reference({i: attention_maps(s) for i, s in signals.items()}, 1, FEATURE_LAYER, v,
                                   proj[:, :N], side)
    assert [len(k) for k in kept] == [budget, budget]
    retained, _ = vs.select(tokens, budget)
    assert retained.tolist() == kept
    assert torch.allclose(plan.apply(proj), merged, atol=1e-6)
    assert torch.allclose(plan.weights.sum(-1), torch.ones(2, budget))


def test_vscan_relaxation_is_exact_forward():
    g = torch.Generator().manual_seed(7)
    signals = {1: random_signals(1, 144, g), FEATURE_LAYER: random_signals(1, 144, g)}
    for s in signals.values():
        s.keys.requires_grad_()
    tokens = tokens_from(signals, (12, 12))
    proj = torch.randn(1, 145, 5, generator=g)
    exact = get_compressor("vscan", shallow_layer=1).plan(tokens, 36, projected=proj).weights
    st = get_compressor("vscan", shallow_layer=1, relaxation="straight_through").plan(tokens, 36, projected=proj)
    assert torch.equal(st.weights, exact)
    grads = torch.autograd.grad(st.weights.sum(), [s.keys for s in signals.values()])
    assert all(gr.abs().sum() > 0 for gr in grads)


# ---------------------------------------------------------------------------------------------- FlowCut
def flowcut_reference(layers, hidden_states: torch.Tensor, select_layer: int, target_num: int):
    """CLIPEncoder_forward / CLIPEncoderLayer_forward / CLIPAttention_forward of the FlowCut reference, line by
    line, for one image (LLaVA-1.5, select_feature 'patch'): returns hidden_states[-2] without CLS and the kept
    patch indices."""
    target = target_num + 1
    bsz = hidden_states.shape[0]
    patch_ids = torch.arange(hidden_states.shape[1] - 1)
    cumulative_scores = None
    encoder_states = ()
    for idx, layer in enumerate(layers):
        rpl = select_layer - idx - 1
        encoder_states = encoder_states + (hidden_states,)
        attn = layer.self_attn
        residual = hidden_states
        h = layer.layer_norm1(hidden_states)
        _, tgt_len, embed_dim = h.size()
        H, hd = attn.num_heads, attn.head_dim
        query_states = attn.q_proj(h) * attn.scale
        key_states = attn.k_proj(h).view(bsz, -1, H, hd).transpose(1, 2).contiguous()
        value_states = attn.v_proj(h).view(bsz, -1, H, hd).transpose(1, 2).contiguous()
        value_metric = value_states.clone()
        proj_shape = (bsz * H, -1, hd)
        query_states = query_states.view(bsz, tgt_len, H, hd).transpose(1, 2).contiguous().view(*proj_shape)
        key_states = key_states.view(*proj_shape)
        value_states = value_states.view(*proj_shape)
        src_len = key_states.size(1)
        attn_weights = torch.bmm(query_states, key_states.transpose(1, 2))
        cls_value = value_states[:, :1]
        semantic_weight = torch.bmm(cls_value, value_states.transpose(1, 2))
        attn_weights = torch.softmax(attn_weights, dim=-1)
        semantic_attn = torch.softmax(semantic_weight, dim=-1).view(bsz, H, src_len)
        attn_weights_reshaped = attn_weights.view(bsz, H, tgt_len, src_len)
        attn_output = torch.bmm(attn_weights, value_states).view(bsz, H, tgt_len, hd).transpose(1, 2)
        attn_output = attn.out_proj(attn_output.reshape(bsz, tgt_len, embed_dim))
        semantic_attn, v_metric = semantic_attn.mean(1), value_metric.mean(1)
        hidden_states = residual + attn_output
        residual = hidden_states
        hidden_states = residual + layer.mlp(layer.layer_norm2(hidden_states))
        if hidden_states.shape[1] > target:
            cls_attention = attn_weights_reshaped[:, :, 0, 1:].mean(dim=1)
            relation_score = cls_attention / cls_attention.sum(dim=-1, keepdim=True)
            sem = semantic_attn[:, 1:]
            semantic_score = sem / sem.sum(dim=-1, keepdim=True)
            scores = (relation_score + semantic_score) * torch.norm(v_metric[:, 1:], p=1, dim=-1)
            cumulative_scores = scores.clone() if cumulative_scores is None else 0.5 * cumulative_scores + 0.5 * scores
            if not rpl % 2:
                if rpl:  # adaptive_prune_ratio(cls_attention, rpl, target - 1)
                    n = cls_attention.shape[-1]
                    prob = cls_attention / cls_attention.sum(dim=-1, keepdim=True)
                    entropy = -torch.sum(prob * torch.log(prob), dim=-1)
                    entropy_ratio = entropy / torch.log(torch.tensor(n))
                    r = (n - (target - 1)) / rpl ** 0.5 * (1 - entropy_ratio ** 2)
                    if r.shape[0] > 1:
                        r = r.max(0).values
                    prune_num = int(r.round())
                else:
                    prune_num = hidden_states.shape[1]
                target_n = max(hidden_states.shape[1] - prune_num, target)
                _, keep_indices = torch.topk(cumulative_scores, target_n - 1, dim=1)
                keep_indices = keep_indices.sort(dim=1).values
                topk_states = torch.gather(hidden_states[:, 1:, :], 1,
                                           keep_indices.unsqueeze(-1).expand(-1, -1, hidden_states.size(-1)))
                cumulative_scores = torch.gather(cumulative_scores, 1, keep_indices)
                patch_ids = patch_ids[keep_indices[0]]
                hidden_states = torch.cat([hidden_states[:, :1, :], topk_states], dim=1)
    encoder_states = encoder_states + (hidden_states,)
    return encoder_states[-2][:, 1:], patch_ids


def _clip(adapter, pixels):
    tower = adapter.model.model.vision_tower
    vision = getattr(tower, "vision_model", tower)
    return vision, vision.pre_layrnorm(vision.embeddings(adapter.normalize(pixels)))


@pytest.mark.parametrize("budget", [36, 100, 1])
def test_flowcut_matches_the_reference_on_the_tiny_clip(tiny_adapter, budget):
    pixels = to_pixels([generate_sample(i) for i in range(2)])
    vision, x = _clip(tiny_adapter, pixels)
    layers = vision.encoder.layers
    assert len(layers) - 2 == tiny_adapter.feature_layer  # the reference's select_layer
    with torch.no_grad():
        embeds, plan = get_compressor("flowcut").compress_pixels(tiny_adapter, pixels, budget)
        for b in range(2):
            feats, kept = flowcut_reference(layers, x[b:b + 1], len(layers) - 2, budget)
            assert plan.primary_sources()[b].tolist() == kept.tolist()
            assert torch.allclose(embeds[b], tiny_adapter.project(feats)[0], atol=1e-5)


def test_flowcut_full_budget_is_the_plain_encoder(tiny_adapter):
    pixels = to_pixels([generate_sample(0)])
    with torch.no_grad():
        embeds, plan = get_compressor("flowcut").compress_pixels(tiny_adapter, pixels, 144)
        assert torch.allclose(embeds, tiny_adapter.project(tiny_adapter.encode(pixels).features), atol=1e-5)
    assert plan.primary_sources().tolist() == [list(range(144))]


@pytest.mark.parametrize("weights", ["random", "trained"])
def test_flowcut_progressive_adaptive_pruning_matches_the_reference(request, weights):
    """A deeper stack (the tiny encoder's layers repeated) so that several even-rpl layers prune adaptively."""
    adapter = request.getfixturevalue("tiny_adapter" if weights == "random" else "builtin_adapter")
    pixels = to_pixels([generate_sample(i) for i in range(3)])
    vision, x = _clip(adapter, pixels)
    layers = list(vision.encoder.layers) * 3  # 12 layers; select layer 10 -> pruning after layers 1, 3, ..., 9
    sizes = []
    comp = FlowCut()
    with torch.no_grad():
        for b in range(3):
            feats, kept = flowcut_reference(layers, x[b:b + 1], 10, 20)
            ours, ours_kept = comp._one(layers[:11], x[b:b + 1], 10, 21)
            assert ours_kept.tolist() == kept.tolist() and torch.allclose(ours, feats, atol=1e-5)
            sizes.append(ours.shape[1])
    assert sizes == [20, 20, 20]


def test_flowcut_score_and_adaptive_count_by_hand():
    # uniform CLS attention: entropy ratio 1 -> nothing pruned early; a peaked one prunes (N - t)/sqrt(rpl) * (1 - h^2)
    assert adaptive_prune_count(torch.full((1, 100), 0.01), 4, 20) == 0
    att = torch.full((1, 100), 1e-4)
    att[0, 0] = 1.0
    p = att / att.sum()
    h = float(-(p * p.log()).sum() / math.log(100))
    assert adaptive_prune_count(att, 4, 20) == round(80 / 2 * (1 - h * h))
    cls_attn = torch.tensor([[0.2, 0.6, 0.2]])
    semantic = torch.tensor([[1.0, 1.0, 2.0]])
    values = torch.tensor([[[1.0, -1.0], [0.5, 0.5], [2.0, 0.0]]])  # L1 norms 2, 1, 2
    assert torch.allclose(flow_score(cls_attn, semantic, values), torch.tensor([[(0.2 + 0.25) * 2, (0.6 + 0.25) * 1,
                                                                                  (0.2 + 0.5) * 2]]))
    assert FlowCut().budget_mapping(64, 576, 23) == {"budget": 64, "target_tokens_with_cls": 65,
                                                      "prune_after_layers": list(range(1, 22, 2))}


# ---------------------------------------------------------------------------------------------- CDPruner core
from robustvtc.compression import cdpruner  # noqa: E402  (the selection rule; not a registered compressor)


def cdpruner_reference(image_features: torch.Tensor, image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                       visual_token_num: int) -> torch.Tensor:
    """CDPruner's encode_images after the projector, line by line (``image_features`` already projected)."""
    B, N, _ = image_features.shape
    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)
    image_normalized = image_normalized.float()
    similarity = torch.matmul(image_normalized, image_normalized.transpose(1, 2))
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    rel = torch.matmul(image_embeds, text_embeds.t())
    rel = (-rel).mean(dim=-1)
    rel = (rel - rel.min() + 1e-6) / (rel.max() - rel.min())
    kernel = rel.unsqueeze(2) * similarity * rel.unsqueeze(1)
    cis = torch.zeros((visual_token_num, B, N))
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    select_idx = torch.empty((visual_token_num, B), dtype=torch.long)
    for i in range(visual_token_num):
        j = torch.argmax(di2s, dim=-1)
        select_idx[i] = j
        eis = (kernel[torch.arange(B), j] - torch.einsum('tb,tbn->bn', cis[:i, torch.arange(B), j], cis[:i])) \
            / torch.sqrt(di2s[torch.arange(B), j]).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[torch.arange(B), j] = -float('inf')
    return torch.sort(select_idx.t()).values


def test_cdpruner_dpp_prefers_a_diverse_token_over_a_duplicate():
    # 0 and 1 near-duplicates, 2 orthogonal; relevance 1 > 0.9 > 0.5: greedy MAP takes 0, then 2 (not 1)
    S = torch.tensor([[1.0, 0.99, 0.0], [0.99, 1.0, 0.0], [0.0, 0.0, 1.0]])
    r = torch.tensor([1.0, 0.9, 0.5])
    kernel = (r.unsqueeze(1) * S * r.unsqueeze(0)).unsqueeze(0)
    assert cdpruner.fast_map_dpp(kernel, 2).tolist() == [[0, 2]]
    # relevance: min-max of the negated mean cosine to the text; the least text-similar token scores highest
    img = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    rel = cdpruner.relevance(img, torch.tensor([[1.0, 0.0]]))
    assert torch.allclose(rel, torch.tensor([[1e-6, 1 + 1e-6, 1 - 2 ** -0.5 + 1e-6]]), atol=1e-6)


@pytest.mark.parametrize("k", [1, 8, 30])
def test_cdpruner_matches_the_reference_on_random_inputs(k):
    g = torch.Generator().manual_seed(8)
    feats, img, text = (torch.randn(1, 36, 48, generator=g),  # D > N: a full-rank kernel
                        torch.randn(1, 36, 5, generator=g),
                        torch.randn(2, 5, generator=g))
    expected = cdpruner_reference(feats, img, text, k)
    assert torch.equal(cdpruner.cdpruner_select(feats, img, text, k), expected)
    assert len(set(expected[0].tolist())) == k
