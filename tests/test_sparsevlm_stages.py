"""SparseVLM v1.5's multi-stage schedule with token recycling (Gumpest/SparseVLMs @ 26a5f48) against a line-by-line
re-statement of its reference code, and the in-LLM hook's merge output it runs through."""
from __future__ import annotations

import math

import pytest
import torch

from robustvtc.compression import get_compressor
from robustvtc.compression.base import InLLMHook
from robustvtc.compression.sparsevlm import SETTINGS, dpc_knn_clusters, dpc_knn_weights, official_stage, text_raters
from robustvtc.data.synthetic import generate_sample, to_pixels
from robustvtc.errors import UserInputError
from robustvtc.models.base import InLLMContext
from robustvtc.models.hf import _drop_visual
from robustvtc.target import Target


# ---------------------------------------------------------------------------------------------- the reference
def index_points(points, idx):
    device = points.device
    B = points.shape[0]
    view_shape = list(idx.shape)
    view_shape[1:] = [1] * (len(view_shape) - 1)
    repeat_shape = list(idx.shape)
    repeat_shape[0] = 1
    batch_indices = torch.arange(B, dtype=torch.long).to(device).view(view_shape).repeat(repeat_shape)
    return points[batch_indices, idx, :]


def cluster_and_merge(x, cluster_num, noise=True):
    """``llava/model/language_model/utils.py`` ``cluster_and_merge``, line by line; also returns the centres and the
    assignment (``noise=False`` drops the 1e-6 random density tie-break)."""
    B, N, C = x.shape
    x1 = x[:, :, None, :]
    x2 = x[:, None, :, :]
    distance = (x1 - x2).norm(dim=-1, p=2)
    dist_matrix = distance / (C ** 0.5)
    dist_nearest, index_nearest = torch.topk(dist_matrix, k=cluster_num, dim=-1, largest=False)
    density = (-(dist_nearest ** 2).mean(dim=-1)).exp()
    if noise:
        density = density + torch.rand(density.shape, device=density.device, dtype=density.dtype) * 1e-6
    mask = density[:, None, :] > density[:, :, None]
    mask = mask.type(x.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist, index_parent = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
    score = dist * density
    _, index_down = torch.topk(score, k=cluster_num, dim=-1)
    dist_matrix = index_points(dist_matrix, index_down)
    idx_cluster = dist_matrix.argmin(dim=1)
    idx_batch = torch.arange(B, device=x.device)[:, None].expand(B, cluster_num)
    idx_tmp = torch.arange(cluster_num, device=x.device)[None, :].expand(B, cluster_num)
    idx_cluster[idx_batch.reshape(-1), index_down.reshape(-1)] = idx_tmp.reshape(-1)
    B, N, C = x.shape
    token_weight = x.new_ones(B, N, 1)
    idx_batch = torch.arange(B, device=x.device)[:, None]
    idx = idx_cluster + idx_batch * cluster_num
    all_weight = token_weight.new_zeros(B * cluster_num, 1)
    all_weight.index_add_(dim=0, index=idx.reshape(B * N), source=token_weight.reshape(B * N, 1))
    all_weight = all_weight + 1e-6
    norm_weight = token_weight / all_weight[idx]
    x_merged = x.new_zeros(B * cluster_num, C)
    source = x * norm_weight
    x_merged.index_add_(dim=0, index=idx.reshape(B * N), source=source.reshape(B * N, C).type(x.dtype))
    return x_merged.reshape(B, cluster_num, C), index_down, idx_cluster


def reference_stage(layer_out, attn, v_token_start, v_token_num, text_token_start, t_token_idx, sparse_k):
    """``LlamaDynamicvitModel.forward``'s inference branch at a pruning layer (v1.5, batch 1, no pre-prompt
    special cases): ``attn`` (1, H, L, L) the layer's softmax attention, ``layer_out`` (1, L, D) its output.
    Returns the new hidden states and visual token count."""
    self_attn_weights = attn.mean(1)
    t_idx = t_token_idx[1] + text_token_start
    relation_vis_text = self_attn_weights[:, t_idx, v_token_start: v_token_start + v_token_num].mean(1)
    mask = torch.zeros_like(relation_vis_text, dtype=bool)
    _, indices = torch.topk(relation_vis_text, min(sparse_k, v_token_num - 1), dim=1)
    mask[0][indices] = 1
    pred_score_vis = mask
    B = 1
    policy = torch.ones(B, layer_out.shape[1], dtype=layer_out.dtype)
    policy[:, v_token_start:text_token_start] = pred_score_vis.type(dtype=layer_out.dtype)
    total_sparse_token_idx = torch.where(policy == 0)[1].unsqueeze(0)
    total_sparse_token = layer_out[:, total_sparse_token_idx[0]]
    merge_token_idx_stage1 = torch.where(pred_score_vis == 0)[1]
    merge_token_stage1 = relation_vis_text[0][merge_token_idx_stage1]
    merge_token_num_stage1 = int(merge_token_idx_stage1.shape[0] * 0.3) + 1
    merge_token_stage2_idx = merge_token_stage1.topk(merge_token_num_stage1)[1]
    merge_token_stage2 = total_sparse_token[:, merge_token_stage2_idx, :]
    cluster_num = int(merge_token_stage2.shape[1] / 10) + 1
    merge_sparse_token, _, _ = cluster_and_merge(merge_token_stage2, cluster_num, noise=False)
    select_token_idx = torch.where(policy == 1)[1].unsqueeze(0)
    select_token = layer_out[:, select_token_idx[0]]
    n_vis = int(pred_score_vis.sum())
    out = torch.cat((select_token[:, :v_token_start + n_vis], merge_sparse_token,
                     select_token[:, v_token_start + n_vis:]), dim=1)
    return out, n_vis + cluster_num


def reference_raters(embeds, v_token_start, text_token_start):
    v_t = embeds[:, v_token_start: text_token_start, :]
    t_t = embeds[:, text_token_start:, :]
    m_v_t = (v_t @ t_t.transpose(1, 2)).softmax(2).mean(1)
    return torch.where(m_v_t > m_v_t.mean())


# ---------------------------------------------------------------------------------------------- DPC-kNN
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("seed,m,c", [(0, 12, 2), (1, 30, 4), (2, 83, 9), (3, 5, 1)])
def test_dpc_knn_matches_the_reference(seed, m, c, dtype):
    """Exact centres and assignments. In float32 against the reference without its 1e-6 density noise (with it,
    exact density ties -- mutual nearest pairs at cluster_num 2 -- are broken at random); in float16, the official
    run's dtype, against the reference with the noise, which is below float16's resolution there."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, m, 16, generator=g)
    close = x[:, 1::3].shape[1]
    x[:, 1::3] = x[:, ::3][:, :close] + 0.05 * torch.randn(2, close, 16, generator=g)  # some close pairs
    x = x.to(dtype)
    torch.manual_seed(seed)
    merged, centres_ref, assign_ref = cluster_and_merge(x, c, noise=dtype == torch.float16)
    centres, assign = dpc_knn_clusters(x, c)
    assert torch.equal(centres, centres_ref) and torch.equal(assign, assign_ref)
    _, w = dpc_knn_weights(x, c)
    tol = 1e-6 if dtype == torch.float32 else 2e-3  # the weighted sums differ only by summation order
    assert w.dtype == dtype and torch.allclose((w @ x).float(), merged.float(), atol=tol, rtol=tol)


# ---------------------------------------------------------------------------------------------- three stages
PRE, N, TEXT, D, HEADS = 3, 40, 6, 8, 2


def _attention(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(1, H, L, L) causal softmax attention with per-head query maps ``w`` (H, D, D): a stand-in layer."""
    q = torch.einsum("bld,hde->bhle", h, w)
    logits = q @ h.transpose(1, 2).unsqueeze(1) / math.sqrt(h.shape[-1])
    L = h.shape[1]
    return logits.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf")).softmax(-1)


def _layer(h: torch.Tensor, i: int) -> torch.Tensor:
    """A stand-in decoder layer between the pruning points."""
    w = torch.randn(D, D, generator=torch.Generator().manual_seed(100 + i)) / math.sqrt(D)
    return h + torch.tanh(h @ w)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_three_stages_match_the_reference(seed):
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(1, PRE + N + TEXT, D, generator=g)
    heads = [torch.randn(HEADS, D, D, generator=g) for _ in range(3)]
    tops = [20, 12, 5]
    # reference: raters once, then per stage the layer output, its attention, prune + recycle
    v_start, v_num = PRE, N
    t_idx = reference_raters(embeds, v_start, v_start + v_num)
    h_ref = embeds
    counts, refs = [], []
    for s, k in enumerate(tops):
        h_ref = _layer(h_ref, s)
        h_ref, v_num = reference_stage(h_ref, _attention(h_ref, heads[s]), v_start, v_num, v_start + v_num, t_idx, k)
        counts.append(v_num)
        refs.append(h_ref)
    # ours: the hook over hand-built contexts, hidden states through the adapters' _drop_visual
    comp = get_compressor("sparsevlm", layers=(1, 2, 3))
    hook = InLLMHook(comp, dict(zip((1, 2, 3), counts)))
    h = embeds
    mask = torch.ones(1, h.shape[1], dtype=torch.long)
    positions = torch.arange(h.shape[1]).unsqueeze(0)
    visual = torch.arange(PRE, PRE + N).unsqueeze(0)
    text = (torch.arange(PRE + N, PRE + N + TEXT).unsqueeze(0), torch.ones(1, TEXT, dtype=torch.bool))
    for s in range(3):
        h = _layer(h, s)
        att = _attention(h, heads[s]).mean(1)
        ctx = InLLMContext(s + 1, h, mask, visual, text[0], text[1], lambda q, att=att: att[:, q[0]],
                           lambda: None, embeds)
        if s == 0:
            assert torch.equal(text_raters(ctx)[0].nonzero()[:, 0], t_idx[1])
        keep, gain, merge = hook.select(ctx)
        assert gain is None and merge.shape[1] == counts[s]
        h, mask, positions, visual, text, _ = _drop_visual(h, mask, positions, visual, text, keep, gain, merge)
        assert h.shape == refs[s].shape and torch.allclose(h, refs[s], atol=1e-6)
        kept_rows = PRE + int((merge[0].max(-1).values == 1).sum())
        assert torch.equal(h[:, :kept_rows], refs[s][:, :kept_rows])  # prefix and kept visual tokens: exact copies
        assert torch.equal(h[:, -TEXT:], refs[s][:, -TEXT:])
        h = refs[s]  # the same input to the next stand-in layer (merged values agree to float rounding only)
    assert hook.last_keep.shape == (1, counts[-1]) and (hook.last_keep.diff(dim=1) > 0).all()
    assert torch.allclose(hook.last_weights.sum(-1), torch.ones(1, counts[-1]), atol=1e-4)


def test_stage_keeps_exact_tokens_and_appends_clusters_in_centre_order():
    g = torch.Generator().manual_seed(5)
    n, d = 24, 6
    hidden = torch.randn(1, 30, d, generator=g)
    visual = torch.arange(2, 2 + n).unsqueeze(0)
    scores = torch.rand(1, n, generator=g)
    k = 10
    left = k + 1  # 14 dropped -> int(4.2) + 1 = 5 recycled -> int(0.5) + 1 = 1 cluster
    places, gain, merge = official_stage(hidden, visual, scores, left)
    kept = scores.topk(k).indices.sort().values
    assert torch.equal(merge[0, :k].argmax(-1), kept[0]) and torch.equal(merge[0, :k].sum(-1), torch.ones(k))
    dropped = [i for i in range(n) if i not in kept[0].tolist()]
    recycled = sorted(dropped, key=lambda i: -float(scores[0, i]))[:5]
    assert set(merge[0, k:].nonzero()[:, 1].tolist()) == set(recycled)
    assert places.shape == (1, left) and gain is None


# ---------------------------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("setting,final", [(192, 113), (128, 39), (96, 27), (64, 18)])
def test_official_schedules_on_llava_1_5(setting, final):
    sv = get_compressor("sparsevlm")
    m = sv.budget_mapping(final, 576, 32)
    assert m["paper_setting"] == setting and m["topk_per_layer"] == list(SETTINGS[setting])
    assert m["prune_before_layers"] == [3, 7, 16] and m["paper_layers"] == [2, 6, 15]
    assert m["kept_per_layer"][-1] == final and m["exact_official_schedule"]
    assert sv.schedule(final, 576, 32)[16] == final


def test_other_budgets_and_the_one_stage_form():
    sv = get_compressor("sparsevlm")
    m = sv.budget_mapping(50, 576, 32)
    assert m["paper_setting"] == 192 and m["topk_per_layer"][:2] == [300, 200] and m["kept_per_layer"][-1] == 50
    assert not m["exact_official_schedule"]
    big = sv.budget_mapping(400, 576, 32)
    assert big["paper_setting"] is None and big["kept_per_layer"][-1] == 400
    assert sv.budget_mapping(576, 576, 32)["kept_per_layer"] == [576, 576, 576]
    with pytest.raises(UserInputError, match="out of range"):
        sv.schedule(2, 576, 32)
    one = get_compressor("sparsevlm", stages="one")
    assert one.schedule(64, 576, 32) == {3: 64} and get_compressor("sparsevlm", layer=2).stages == "one"
    with pytest.raises(UserInputError):
        get_compressor("sparsevlm", stages="multi", layer=2)
    with pytest.raises(UserInputError):
        get_compressor("sparsevlm", layers=(3, 7))


# ---------------------------------------------------------------------------------------------- on the model
@pytest.fixture(scope="module")
def batch():
    samples = [generate_sample(i) for i in (0, 4)]
    return to_pixels(samples), [s.question for s in samples]


def test_multi_stage_on_the_tiny_model(tiny_adapter, batch):
    pixels, questions = batch
    cands = ["yes", "no"]
    target = Target(tiny_adapter, "sparsevlm", 30, layers=(1, 2, 3))
    px = pixels.clone().requires_grad_()
    fwd = target.forward(px)
    logp = tiny_adapter.candidate_logprobs(fwd.embeds, questions, cands, in_llm=fwd.in_llm)
    keep = fwd.in_llm.last_keep
    assert keep.shape == (2, 30) and (keep.diff(dim=1) > 0).all() and torch.isfinite(logp).all()
    full, _ = tiny_adapter.hidden_states(fwd.embeds, questions)
    _, mask = tiny_adapter.hidden_states(fwd.embeds, questions, in_llm=fwd.in_llm)
    assert mask.shape[1] == full.shape[1] - (144 - 30)
    (grad,) = torch.autograd.grad(logp[:, 0].sum(), px)
    assert grad.abs().sum() > 0 and torch.isfinite(grad).all()
    with torch.no_grad():
        again = Target(tiny_adapter, "sparsevlm", 30, layers=(1, 2, 3)).candidate_logprobs(pixels, questions, cands)
        assert torch.equal(again, logp.detach())
        for b in range(2):
            one = Target(tiny_adapter, "sparsevlm", 30, layers=(1, 2, 3))
            lp = one.candidate_logprobs(pixels[b:b + 1], questions[b:b + 1], cands)
            assert torch.allclose(lp[0], logp[b].detach(), atol=1e-4)
    st = Target(tiny_adapter, "sparsevlm", 30, layers=(1, 2, 3), relaxation="straight_through")
    assert torch.equal(st.candidate_logprobs(pixels, questions, cands).detach(), logp.detach())


def test_pure_selection_hooks_are_unchanged_by_the_merge_path():
    h = torch.randn(1, 6, 3)
    mask = torch.ones(1, 6, dtype=torch.long)
    pos = torch.arange(6).unsqueeze(0)
    vis = torch.tensor([[1, 2, 3, 4]])
    text = (torch.tensor([[5]]), torch.ones(1, 1, dtype=torch.bool))
    keep = torch.tensor([[0, 2]])
    plain = _drop_visual(h, mask, pos, vis, text, keep, None)
    one_hot = torch.zeros(1, 2, 4)
    one_hot[0, 0, 0] = one_hot[0, 1, 2] = 1
    merged = _drop_visual(h, mask, pos, vis, text, keep, None, one_hot)
    assert torch.equal(plain[0], merged[0]) and torch.equal(plain[2], merged[2])
    w = torch.zeros(1, 2, 4)
    w[0, 0, 0], w[0, 1, [1, 2, 3]] = 1, 1 / 3
    out = _drop_visual(h, mask, pos, vis, text, keep, None, w)[0]
    assert torch.equal(out[0, 1], h[0, 1]) and torch.allclose(out[0, 2], h[0, 2:5].mean(0))
