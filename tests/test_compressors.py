"""Per-method tests: hand-built inputs where each published rule fixes the answer."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from robustvtc.compression import get_compressor
from robustvtc.compression.base import InLLMHook, soft_membership
from robustvtc.models.base import split_budget
from robustvtc.compression.divprune import greedy_max_min
from robustvtc.compression.pooling import pool_shape
from robustvtc.compression.prumerge import iqr_outlier_count, single_head_cls_attention
from robustvtc.compression.tome import bipartite_soft_matching, merge_schedule
from robustvtc.data.synthetic import generate_sample, to_pixels
from robustvtc.errors import UserInputError
from robustvtc.models.base import InLLMContext, LayerSignals, VisualTokens
from robustvtc.target import Target
from test_real_adapters import eager_attentions

FEATURE_LAYER, NUM_LAYERS = 2, 4


def make_tokens(logits: torch.Tensor, metric: torch.Tensor, features: torch.Tensor | None = None,
                extra_signals: dict | None = None) -> VisualTokens:
    """Tokens whose feature-layer CLS->patch attention is ranked by ``logits`` (B, N) and whose head-mean
    keys are ``metric`` (B, N, m): head 0 carries the logits, head 1 cancels them in the key mean and carries
    the metric (its CLS query is zero, so it only adds a uniform term to the CLS attention)."""
    B, N = logits.shape
    m = metric.shape[-1]
    q = torch.zeros(B, 2, N + 1, m + 1)
    q[:, 0, 0, 0] = 1.0
    k = torch.zeros(B, 2, N + 1, m + 1)
    k[:, 0, 1:, 0], k[:, 1, 1:, 0] = logits, -logits
    k[:, 1, 1:, 1:] = 2 * metric
    side = math.isqrt(N)
    feats = torch.randn(B, N, 8, generator=torch.Generator().manual_seed(0)) if features is None else features
    signals = {FEATURE_LAYER: LayerSignals(q, k, 1.0), **(extra_signals or {})}
    return VisualTokens(feats, torch.randn(B, feats.shape[-1]), (side, side), FEATURE_LAYER, signals, NUM_LAYERS)


# ---------------------------------------------------------------------------------------------- VisionZip
def test_visionzip_split_follows_the_54_10_ratio():
    vz = get_compressor("visionzip")
    assert [vz.split(k) for k in (32, 64, 128, 192)] == [(27, 5), (54, 10), (108, 20), (162, 30)]
    assert vz.budget_mapping(64, 576) == {"budget": 64, "dominant": 54, "contextual": 10, "dominant_patches": 53,
                                         "cls_kept": True}


def _visionzip_case():
    """4x4 grid; patches 5, 10, 14 have the highest CLS attention; budget 8 with ratio 1:1 -> 3 patches + CLS
    dominant, 4 contextual. Remaining patches (13, raster order) -> targets at slots 0, 3, 6, 9 = patches
    0, 3, 7, 11; every other patch's key points at the target chosen below."""
    N = 16
    logits = torch.zeros(1, N)
    logits[0, [5, 10, 14]] = torch.tensor([5.0, 4.0, 3.0])
    targets = [0, 3, 7, 11]
    members = {0: [1, 2], 3: [4, 6, 8], 7: [9, 12, 13, 15], 11: []}
    metric = torch.zeros(1, N, 4)
    for t_slot, t in enumerate(targets):
        metric[0, t, t_slot] = 1.0
        for j in members[t]:
            metric[0, j, t_slot] = 1.0
            metric[0, j, (t_slot + 1) % 4] = 0.3  # not identical, still closest to its target
    return make_tokens(logits, metric), targets, members


def test_visionzip_keeps_cls_top_patches_and_target_plus_mean():
    tokens, targets, members = _visionzip_case()
    plan = get_compressor("visionzip", ratio=(1, 1)).plan(tokens, 8)
    w = plan.weights[0]
    N = 16
    assert w.shape == (8, N + 1)
    assert w[0, N] == 1 and w[0].sum() == 1  # CLS first
    assert [int(w[i].argmax()) for i in (1, 2, 3)] == [5, 10, 14]  # top-3 patches, raster order
    for row, t in zip(w[4:], targets):
        expected = torch.zeros(N + 1)
        expected[t] = 1.0
        if members[t]:
            expected[members[t]] = 1 / len(members[t])
        assert torch.allclose(row, expected)
    feats = torch.cat([tokens.features, tokens.cls.unsqueeze(1)], 1)
    out = plan.apply(feats)[0]
    assert torch.allclose(out[5], feats[0, 3] + feats[0, [4, 6, 8]].mean(0))  # target + mean(assigned)
    assert torch.allclose(out[7], feats[0, 11])  # no members: the target alone


def test_visionzip_true_average_option():
    tokens, targets, members = _visionzip_case()
    w = get_compressor("visionzip", ratio=(1, 1), merge="mean").plan(tokens, 8).weights[0]
    assert torch.allclose(w.sum(-1), torch.ones(8))
    assert torch.allclose(w[6, [7, 9, 12, 13, 15]], torch.full((5,), 0.2))


# ---------------------------------------------------------------------------------------------- VisPruner
def _vispruner_reference(attn: np.ndarray, feats: np.ndarray, budget: int, ratio: float) -> list[int]:
    """The reference loop written out with Python lists (valid for the even remainders used here)."""
    n_imp = int(budget * ratio)
    n_div = budget - n_imp
    order = list(np.argsort(-attn, kind="stable"))
    important, residual = order[:n_imp], order[n_imp:]
    f = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
    while len(residual) - n_div > 0:
        r = min(8, len(residual) - n_div)
        a, b = residual[::2], residual[1::2]
        sims = [max(float(f[i] @ f[j]) for j in b) for i in a]
        keep_a = [a[i] for i in np.argsort(-np.array(sims), kind="stable")[r:]]
        residual = keep_a + b
    return sorted(int(i) for i in important + residual)


def test_vispruner_matches_the_reference_loop():
    g = torch.Generator().manual_seed(1)
    N, budget = 64, 16
    logits, feats = torch.randn(2, N, generator=g), torch.randn(2, N, 6, generator=g)
    feats[:, 1::2] = feats[:, ::2] + 0.01 * torch.randn(2, N // 2, 6, generator=g)  # near-duplicate pairs
    tokens = make_tokens(logits, torch.randn(2, N, 3, generator=g), features=feats)
    plan = get_compressor("vispruner").plan(tokens, budget)
    attn = tokens.cls_attention(None, "mean")
    for b in range(2):
        expected = _vispruner_reference(attn[b].numpy(), feats[b].numpy(), budget, 0.5)
        assert plan.primary_sources()[b].tolist() == expected
        top8 = set(attn[b].topk(8).indices.tolist())
        assert top8 <= set(expected)  # the important half is the attention top-k


# ---------------------------------------------------------------------------------------------- PruMerge
def _prumerge_tokens(B: int = 2, N: int = 36, boosts=((3, 7, 20), (11,))):
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(B, 2, N + 1, 4, generator=g), torch.randn(B, 2, N + 1, 4, generator=g)
    for b, idx in enumerate(boosts):  # a few clear outliers per image
        k[b, :, [i + 1 for i in idx]] = 6 * q[b, :, :1]
    last = LayerSignals(q, k, 0.5)
    return make_tokens(torch.zeros(B, N), torch.randn(B, N, 3, generator=g), extra_signals={NUM_LAYERS - 1: last})


def test_prumerge_attention_is_one_head_over_concatenated_heads():
    tokens = _prumerge_tokens()
    sig = tokens.signals[NUM_LAYERS - 1]
    q = torch.cat([sig.queries[:, 0, 0], sig.queries[:, 1, 0]], -1)
    k = torch.cat([sig.keys[:, 0], sig.keys[:, 1]], -1)
    expected = ((k @ q.unsqueeze(-1)).squeeze(-1) / math.sqrt(8)).softmax(-1)[:, 1:]
    assert torch.allclose(single_head_cls_attention(tokens), expected)


def test_prumerge_adaptive_count_is_the_iqr_outlier_count():
    tokens = _prumerge_tokens()
    attn = single_head_cls_attention(tokens)
    expected = []
    for row in attn.numpy():
        q1, q3 = np.percentile(row, 25), np.percentile(row, 75)
        expected.append(int((row > q3 + 1.5 * (q3 - q1)).sum()))
    assert iqr_outlier_count(attn).tolist() == expected
    assert expected[0] != expected[1]  # the two images differ: per-image counts
    plan = get_compressor("prumerge", adaptive=True).plan(tokens, 10)
    assert plan.lengths.tolist() == [n + 1 for n in expected]  # centres + the extra token
    for b, n in enumerate(expected):
        centres = set(attn[b].topk(n).indices.tolist())
        assert {int(plan.weights[b, i, :-1].argmax()) for i in range(n)} == centres
        assert plan.weights[b, n + 1:].abs().sum() == 0
    embeds, _ = get_compressor("prumerge", adaptive=True).compress(tokens, 10, lambda x: x)
    assert [e.shape[0] for e in embeds] == [n + 1 for n in expected]


def test_prumerge_merge_rule_with_a_budget():
    tokens = _prumerge_tokens(B=1, boosts=((3,),))
    budget, nb = 6, 3
    plan = get_compressor("prumerge", neighbours=nb).plan(tokens, budget)
    attn = single_head_cls_attention(tokens)[0]
    sig = tokens.signals[NUM_LAYERS - 1]
    keys = F.normalize(torch.cat([sig.keys[0, 0, 1:], sig.keys[0, 1, 1:]], -1), dim=-1)
    centres = attn.topk(budget - 1).indices.tolist()  # descending attention order, as the reference
    w = plan.weights[0]
    for row, c in zip(w, centres):
        rest = [j for j in range(36) if j != c]
        sims = [float(keys[c] @ keys[j]) for j in rest]
        nn = [rest[i] for i in np.argsort(sims)[::-1][:nb]]
        expected = torch.zeros(37)
        expected[c] = 1.0
        expected[nn] = attn[nn]
        assert torch.allclose(row, expected, atol=1e-6)
    extra = attn.clone()
    extra[centres] = 0
    assert torch.allclose(w[-1, :-1], extra) and w[-1, -1] == 0


def test_prumerge_plus_adds_uniform_centres():
    tokens = _prumerge_tokens(B=1, boosts=((3,),))
    comp = get_compressor("prumerge_plus")
    assert comp.budget_mapping(145, 576) == {"budget": 145, "centres_by_attention": 36, "spatial_samples": 108,
                                             "extra_token": 1}
    idx, valid, ranked = comp.centres(single_head_cls_attention(tokens), 9)
    assert ranked == 2 and idx.shape == (1, 8) and valid.all()
    attn = single_head_cls_attention(tokens)[0]
    assert idx[0, :2].tolist() == attn.topk(2).indices.tolist()
    rest = [j for j in range(36) if j not in idx[0, :2].tolist()]
    assert idx[0, 2:].tolist() == rest[0:36:34 // 6][:6]
    # adaptive: the reference's arithmetic sequence 0, s, 2s, ... < N - 1 minus the attention centres
    idx, valid, _ = get_compressor("prumerge_plus", adaptive=True).centres(attn.unsqueeze(0), 9)
    n = int(iqr_outlier_count(attn.unsqueeze(0)))
    step = int(int(36 / n) / 3)
    grid = [j for j in range(0, 35, step) if j not in attn.topk(n).indices.tolist()]
    assert idx[0, valid[0]].tolist() == attn.topk(n).indices.tolist() + grid


# ---------------------------------------------------------------------------------------------- DivPrune
def test_divprune_is_the_greedy_max_min_sequence():
    angles = torch.tensor([0.0, 10.0, 20.0, 90.0, 180.0, 185.0]) * math.pi / 180
    pts = torch.stack([angles.cos(), angles.sin()], -1).unsqueeze(0)
    # first: largest nearest-neighbour distance (90 deg, isolated); then farthest from {90}: 185 deg (95 deg
    # away); then farthest from {90, 185}: 0 deg (90 deg from 90, 175 deg from 185); then 20 deg (70 vs 80)
    assert greedy_max_min(pts, 4).tolist() == [[3, 5, 0, 2]]
    tokens = make_tokens(torch.zeros(1, 4), torch.randn(1, 4, 2), features=torch.randn(1, 4, 8))
    # 0, 20, 90, 180 deg: picks 180, then 0, then 90 -> sorted [0, 2, 3]
    plan = get_compressor("divprune").plan(tokens, 3, projected=pts[:, [0, 2, 3, 4]])
    assert plan.space == "projected" and plan.primary_sources().tolist() == [[0, 2, 3]]


# ---------------------------------------------------------------------------------------------- pooling
@pytest.mark.parametrize("budget,shape", [(36, (6, 6)), (25, (5, 5)), (48, (6, 8)), (144, (12, 12))])
def test_pooling_averages_the_adaptive_pool_cells(budget, shape):
    assert pool_shape(budget, (12, 12)) == shape
    feats = torch.randn(2, 144, 5)
    tokens = make_tokens(torch.zeros(2, 144), torch.randn(2, 144, 2), features=feats)
    projected = torch.cat([feats, torch.randn(2, 1, 5)], 1)
    plan = get_compressor("pooling").plan(tokens, budget)
    grid = feats.transpose(1, 2).reshape(2, 5, 12, 12)
    expected = F.adaptive_avg_pool2d(grid, shape).flatten(2).transpose(1, 2)
    assert torch.allclose(plan.apply(projected), expected, atol=1e-6)


def test_pooling_rejects_budgets_it_cannot_make_exactly():
    with pytest.raises(UserInputError, match="nearest accepted budgets: 36, 40"):
        get_compressor("pooling").check_budget(37, 144)


# ---------------------------------------------------------------------------------------------- ToMe
def test_tome_bipartite_matching_by_hand():
    # tokens: CLS, t1..t6 -> A = CLS, t2, t4, t6 ; B = t1, t3, t5. t4 duplicates t3, t6 is close to t5.
    metric = torch.tensor([[[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 1, 0.05], [0, 0, -1], [0, 0.2, -1]]])
    metric = metric.float()
    merge = bipartite_soft_matching(metric, 2)
    x = torch.arange(7.0).view(1, 7, 1)
    # t4 -> t3 and t6 -> t5 merge (sum); unmerged A keeps its order: CLS, t2
    assert merge(x).flatten().tolist() == [0, 2, 1, 3 + 4, 5 + 6]


def test_tome_schedule_and_unreachable_budget():
    assert merge_schedule(144, 36, 3) == [36, 36, 36]
    assert merge_schedule(576, 64, 23) == [23] * 6 + [22] * 17
    with pytest.raises(UserInputError, match="accepted: 18..144"):
        merge_schedule(144, 10, 3)


def test_tome_full_budget_is_the_plain_encoder(tiny_adapter):
    pixels = to_pixels([generate_sample(0)])
    embeds, plan = get_compressor("tome").compress_pixels(tiny_adapter, pixels, 144)
    assert torch.allclose(embeds, tiny_adapter.project(tiny_adapter.encode(pixels).features), atol=1e-5)
    assert torch.equal(plan.weights[0, :, :-1], torch.eye(144))


def test_tome_plan_partitions_the_patches(tiny_adapter):
    pixels = to_pixels([generate_sample(i) for i in range(2)])
    embeds, plan = get_compressor("tome").compress_pixels(tiny_adapter, pixels, 36)
    w = plan.weights
    assert embeds.shape[1] == 36 and plan.space == "encoder"
    assert ((w[..., :-1] > 0).sum(1) == 1).all()  # every patch in exactly one merged token
    assert torch.allclose(w.sum(-1), torch.ones(2, 36)) and (w[..., -1] == 0).all()
    with pytest.raises(TypeError):
        plan.apply(torch.zeros(2, 145, 4))


# ---------------------------------------------------------------------------------------------- in-LLM, hand-built
def _ctx(L: int, visual: list[int], text: list[int], rows=None, current_rows=None, keys=None, hidden=None,
         embeds=None, layer: int = 2) -> InLLMContext:
    hidden = torch.randn(1, L, 4) if hidden is None else hidden
    return InLLMContext(layer, hidden, torch.ones(1, L, dtype=torch.long), torch.tensor([visual]),
                        torch.tensor([text]), torch.ones(1, len(text), dtype=torch.bool), rows,
                        lambda: keys, hidden if embeds is None else embeds, current_rows, lambda h: h)


def test_fastv_rules_last_token_and_received():
    L = 8
    att = torch.rand(1, L, L).tril()
    att = att / att.sum(-1, keepdim=True)
    rows = lambda q: att[:, q[0]]  # noqa: E731
    ctx = _ctx(L, [1, 2, 3, 4], [5, 6, 7], rows=rows)
    assert torch.equal(get_compressor("fastv").scores(ctx), att[:, 7, 1:5])
    assert torch.allclose(get_compressor("fastv", rule="received").scores(ctx), att[:, :, 1:5].mean(1))


def test_pdrop_scores_with_the_layer_about_to_run():
    L = 6
    prev, cur = torch.rand(1, L, L), torch.rand(1, L, L)
    ctx = _ctx(L, [1, 2, 3], [4, 5], rows=lambda q: prev[:, q[0]], current_rows=lambda q: cur[:, q[0]])
    assert torch.equal(get_compressor("pdrop").scores(ctx), cur[:, 5, 1:4])


def test_pdrop_schedule_maps_the_budget_to_the_last_stage():
    pd = get_compressor("pdrop")
    assert pd.schedule(72, 576, 32) == {8: 288, 16: 144, 24: 72}
    assert pd.schedule(36, 144, 3) == {1: 72, 2: 36}
    assert pd.schedule(100, 144, 32) == {8: 144, 16: 144, 24: 100}
    assert get_compressor("pdrop", layers=(2, 5)).budget_mapping(50, 576, 8) == {
        "budget": 50, "prune_before_layers": [2, 5], "kept_per_layer": [100, 50], "lambda": 0.5}


def test_sparsevlm_raters_and_rater_attention():
    # text 4 and 5 align with the visual embeddings (relevance above the mean), text 6 does not
    embeds = torch.zeros(1, 7, 4)
    embeds[0, 1:4, 0] = 1.0
    embeds[0, 4, 0], embeds[0, 5, 0], embeds[0, 6, 1] = 2.0, 2.0, 1.0
    att = torch.rand(1, 7, 7)
    ctx = _ctx(7, [1, 2, 3], [4, 5, 6], rows=lambda q: att[:, q[0]], embeds=embeds, layer=3)
    from robustvtc.compression.sparsevlm import text_raters
    assert text_raters(ctx).tolist() == [[True, True, False]]
    assert torch.allclose(get_compressor("sparsevlm").scores(ctx), att[:, [4, 5], 1:4].mean(1))


def test_dart_picks_least_similar_tokens_per_pivot():
    # visual 1..8, text 9..10; one image pivot (largest key L1: visual 3) and one text pivot (10)
    L = 11
    keys = torch.ones(1, 1, L, 2)
    keys[0, 0, 3] = 5.0
    keys[0, 0, 10] = 4.0
    deg = torch.tensor([0, 0, 10, 0, 90, 100, 180, 270, 200, 0, 95.0]) * math.pi / 180
    hidden = torch.stack([deg.cos(), deg.sin()], -1).unsqueeze(0)
    ctx = _ctx(L, list(range(1, 9)), [9, 10], keys=keys, hidden=hidden)
    keep, gain = get_compressor("dart", pivot_image=1, pivot_text=1).select(ctx, 5)
    # pivot visual 3 (0 deg) picks the 2 least similar: 6 (180), 8 (200); then text 10 (95 deg) picks the 2
    # least similar of the rest: 7 (270 deg, 175 away) and 1 (0 deg, 95 away; 2 at 10 deg is 85 away)
    assert gain is None
    assert (keep[0] + 1).tolist() == [1, 3, 6, 7, 8]
    assert split_budget(132 - 4, 8) == [16] * 8  # the reference's "128" setting keeps 132
    assert get_compressor("dart").budget_mapping(132, 576)["reference_max_num_trunction"] == 128


# ---------------------------------------------------------------------------------------------- in-LLM, on the model
@pytest.fixture(scope="module")
def batch():
    samples = [generate_sample(i) for i in range(2)]
    return to_pixels(samples), [s.question for s in samples]


def test_fastv_keeps_the_top_last_token_attention_of_eager_attention(tiny_adapter, batch):
    pixels, questions = batch
    target = Target(tiny_adapter, "fastv", 20)
    fwd = target.forward(pixels)
    tiny_adapter.candidate_logprobs(fwd.embeds, questions, ["yes"], in_llm=fwd.in_llm)
    embeds, mask, vis, *_ = tiny_adapter._assemble(list(fwd.embeds.unbind(0)), questions, None)
    attentions = eager_attentions(tiny_adapter.model, tiny_adapter.model.model.language_model, inputs_embeds=embeds,
                                  attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    scores = attentions[1][:, :, -1].mean(1).gather(1, vis)  # layer K-1 = 1, last prompt token
    assert torch.equal(fwd.in_llm.last_keep, scores.topk(20).indices.sort().values)


@pytest.mark.parametrize("name,kwargs", [("fastv", {}), ("dart", {}), ("pdrop", {}), ("sparsevlm", {"layer": 2})])
def test_in_llm_at_full_budget_gives_the_uncompressed_logits(tiny_adapter, batch, name, kwargs):
    pixels, questions = batch
    cands = ["yes", "no", "red"]
    full = Target(tiny_adapter, "none").candidate_logprobs(pixels, questions, cands)
    assert torch.equal(Target(tiny_adapter, name, 144, **kwargs).candidate_logprobs(pixels, questions, cands), full)


def test_pdrop_prunes_in_stages_and_renumbers(tiny_adapter, batch):
    pixels, questions = batch
    target = Target(tiny_adapter, "pdrop", 36, layers=(1, 2))
    fwd = target.forward(pixels)
    seen = []
    select = fwd.in_llm.select

    def spy(ctx):
        keep, gain = select(ctx)
        seen.append((ctx.layer, ctx.visual_index.shape[1], keep.shape[1]))
        return keep, gain

    fwd.in_llm.select = spy
    embeds, mask, *_ = tiny_adapter._assemble(list(fwd.embeds.unbind(0)), questions, None)
    _, mask_out = tiny_adapter.hidden_states(fwd.embeds, questions, in_llm=fwd.in_llm)
    assert seen == [(1, 144, 72), (2, 72, 36)]
    assert mask_out.shape[1] == mask.shape[1] - (144 - 36)
    assert fwd.in_llm.position_policy == "contiguous"


def test_in_llm_layer_must_exist(tiny_adapter, batch):
    depth = tiny_adapter.num_llm_layers
    with pytest.raises(UserInputError, match=f"accepted layers: 1..{depth - 1}"):
        Target(tiny_adapter, "sparsevlm", 36, layer=depth).forward(batch[0])


# ---------------------------------------------------------------------------------------------- relaxations
def test_soft_membership_puts_exactly_the_top_k_above_half():
    s = torch.tensor([[0.1, 0.5, 0.3, 0.9, 0.2]])
    m = soft_membership(s, 2, 0.1)
    assert ((m > 0.5) == torch.tensor([[False, True, False, True, False]])).all()


PRE_RELAXABLE = ["fastervlm", "visionzip", "vispruner", "prumerge", "prumerge_plus"]


@pytest.mark.parametrize("name", PRE_RELAXABLE)
def test_pre_llm_relaxations(tiny_adapter, batch, name):
    pixels = batch[0].clone().requires_grad_()
    tokens = tiny_adapter.encode(pixels, get_compressor(name).signal_layers())
    exact = get_compressor(name).plan(tokens, 36).weights
    st = get_compressor(name, relaxation="straight_through").plan(tokens, 36).weights
    soft = get_compressor(name, relaxation="soft_topk").plan(tokens, 36).weights
    assert torch.equal(st, exact)  # exact forward
    (grad,) = torch.autograd.grad(st.sum(), pixels, retain_graph=True)
    assert grad.abs().sum() > 0  # ... and a gradient path to the scores
    assert not torch.equal(soft, exact) and (soft <= exact + 1e-6).all() and (soft >= 0).all()


@pytest.mark.parametrize("name,kwargs", [("fastv", {}), ("pdrop", {}), ("sparsevlm", {"layer": 2})])
def test_in_llm_straight_through_keeps_logits_and_adds_a_score_gradient(tiny_adapter, batch, name, kwargs):
    questions, cands = batch[1], ["yes", "no"]
    out, grads = {}, {}
    for relaxation in ("none", "straight_through"):
        pixels = batch[0].clone().requires_grad_()
        target = Target(tiny_adapter, name, 36, relaxation=relaxation, **kwargs)
        lp = target.candidate_logprobs(pixels, questions, cands)
        (grads[relaxation],) = torch.autograd.grad(lp[:, 0].sum(), pixels)
        out[relaxation] = lp.detach()
    assert torch.equal(out["none"], out["straight_through"])
    assert not torch.allclose(grads["none"], grads["straight_through"])


def test_hook_tracks_original_indices_across_stages():
    comp = get_compressor("pdrop", layers=(1, 2))
    hook = InLLMHook(comp, {1: 3, 2: 2})
    comp.select = lambda ctx, keep: (torch.tensor([[4, 1, 2]]) if keep == 3 else torch.tensor([[2, 0]]), None)
    hook.select(_ctx(8, [1, 2, 3, 4, 5, 6], [7], layer=1))
    keep, _ = hook.select(_ctx(8, [1, 2, 3], [7], layer=2))
    assert keep.tolist() == [[0, 2]] and hook.last_keep.tolist() == [[1, 4]]
