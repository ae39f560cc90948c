"""The seed methods of issue 23: TokenCarve's rule (registered, merging through the in-LLM hook) against a
line-by-line re-statement of its reference code; the list of seed methods not registered, and why, as the CLI prints it;
every registered compressor states its fidelity."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from robustvtc.cli import main
from robustvtc.compression import COMPRESSORS, NOT_REGISTERED, tokencarve


# ---------------------------------------------------------------------------------------------- TokenCarve
def tokencarve_reference(attn: torch.Tensor, layer_out: torch.Tensor, sys_len: int, img_len: int, nums: int,
                         mode: int = 0, weight: float = 0.5) -> tuple[list[int], torch.Tensor]:
    """ShawnTan86/TokenCarve modeling_llama.py, LlamaModel.forward at ``layer_idx == work_layer``, line by line
    (batch 1): ``attn`` (1, H, L, L) the previous layer's attention, ``layer_out`` (1, L, D) its output.
    Returns the kept sequence positions (sorted) and the hidden states after the in-place merge, at them."""
    layer_out = layer_out.clone()
    L = layer_out.shape[1]
    rank = int(nums / 2 * 3)
    merge_nums = int(nums / 2)
    avg = torch.mean(attn, dim=1)[0]
    last_img = avg[-1][sys_len:sys_len + img_len]
    av_top = last_img.topk(rank).indices + sys_len
    _, av_order = torch.sort(last_img, descending=True)
    x = layer_out[0].to(torch.float32)[sys_len:sys_len + img_len, :]
    U, S, Vt = torch.linalg.svd(x)
    rows = torch.sum(torch.abs(U @ torch.diag(S)), dim=1)
    sv_top = rows.topk(rank).indices + sys_len
    _, sv_order = torch.sort(rows, descending=True)
    w = torch.arange(len(sv_order), 0, -1)
    points = torch.zeros(len(sv_order))
    points[av_order] += w * weight
    points[sv_order] += w * (1 - weight)
    top = {0: points.topk(rank).indices + sys_len, 2: av_top, 1: sv_top}[mode]
    metric = layer_out[0] / layer_out[0].norm(dim=-1, keepdim=True)
    half = int(0.5 * len(top))
    scores = metric[top[half:]] @ metric[top[:half]].transpose(-1, -2)
    best, best_idx = scores.max(dim=-1)
    reduce = min(half, merge_nums)
    merge_i = best.sort(descending=True).indices[:reduce]
    remain_i = best.sort(descending=True).indices[reduce:]
    real_b = top[merge_i + half]
    real_rest = top[remain_i + half]
    real_a = top[best_idx[merge_i]]
    comp = torch.cat((top[:half], real_rest))
    layer_out[0].scatter_reduce_(0, real_a.unsqueeze(1).expand(-1, layer_out[0].size(1)), layer_out[0][real_b],
                                 reduce="mean")
    keep = torch.cat((torch.arange(sys_len), comp, torch.arange(sys_len + img_len, L))).sort().values
    image_keep = [int(i) for i in keep if sys_len <= i < sys_len + img_len]
    return image_keep, layer_out[0, image_keep]


def _case(seed: int, n: int = 36, d: int = 48, sys_len: int = 3, text: int = 4, heads: int = 2):
    g = torch.Generator().manual_seed(seed)
    L = sys_len + n + text
    attn = torch.rand(1, heads, L, L, generator=g).tril()
    attn = attn / attn.sum(-1, keepdim=True)
    out = torch.randn(1, L, d, generator=g)
    return attn, out, sys_len, n


@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("nums", [2, 7, 16, 24])
def test_tokencarve_matches_the_reference(mode, nums):
    attn, out, s, n = _case(nums + 10 * mode)
    kept_ref, hidden_ref = tokencarve_reference(attn, out, s, n, nums, mode)
    av = attn.mean(1)[0, -1, s:s + n]
    image = out[0, s:s + n]
    kept, w = tokencarve.tokencarve_plan(av, image, nums, mode)
    assert len(kept_ref) == nums
    assert (kept + s).tolist() == kept_ref
    assert torch.allclose(w @ image, hidden_ref, atol=1e-6)


def test_tokencarve_by_hand():
    # K = 4: R = 6 candidates, M = 2 merges; A = 3 best, B = 3 next; AV alone (mode 2) ranks 0 > 1 > ... > 5
    av = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.1, 0.0])
    e = torch.eye(4)
    hidden = torch.stack([e[0], e[1], e[2], e[0] + 0.1 * e[3], e[1] + 0.5 * e[3], e[3], e[2], e[2]])
    kept, w = tokencarve.tokencarve_plan(av, hidden, 4, mode=2)
    # B = {3, 4, 5}: 3 is closest to A's 0 (cos .995), 4 to 1 (.89), 5 to none (0): 3 and 4 merge, 5 stays
    assert kept.tolist() == [0, 1, 2, 5]
    assert torch.allclose(w[0, [0, 3]], torch.tensor([0.5, 0.5])) and torch.allclose(w[1, [1, 4]], torch.full((2,), .5))
    assert torch.equal(w[2], torch.eye(8)[2]) and torch.equal(w[3], torch.eye(8)[5])
    assert tokencarve.counts(64) == (96, 32) and tokencarve.counts(192) == (288, 96)
    with pytest.raises(ValueError):
        tokencarve.tokencarve_plan(av, hidden, 6, mode=2)  # R = 9 > N = 8


def test_tokencarve_svd_score_is_the_reference_on_wide_and_the_reduced_svd_on_tall_inputs():
    x = torch.randn(5, 9, generator=torch.Generator().manual_seed(1))
    U, S, _ = torch.linalg.svd(x)
    assert torch.allclose(tokencarve.svd_contribution(x), (U @ torch.diag(S)).abs().sum(1), atol=1e-5)
    tall = torch.randn(9, 5, generator=torch.Generator().manual_seed(2))
    u, s, _ = torch.linalg.svd(tall, full_matrices=False)
    assert torch.allclose(tokencarve.svd_contribution(tall), (u * s).abs().sum(1))


@pytest.mark.parametrize("nums", [4, 16])
def test_registered_tokencarve_merges_through_the_hook_as_the_reference(nums):
    from robustvtc.compression import get_compressor
    from robustvtc.models.base import InLLMContext
    from robustvtc.models.hf import _drop_visual

    attn, out, s, n = _case(nums + 3)
    kept_ref, hidden_ref = tokencarve_reference(attn, out, s, n, nums, 0)
    L = out.shape[1]
    avg = attn.mean(1)
    visual = torch.arange(s, s + n).unsqueeze(0)
    text = torch.arange(s + n, L).unsqueeze(0)
    valid = torch.ones_like(text, dtype=torch.bool)
    ctx = InLLMContext(2, out, torch.ones(1, L, dtype=torch.long), visual, text, valid, lambda q: avg[:, q[0]],
                       lambda: None, out)
    hook = get_compressor("tokencarve").bind(nums, n, 4)
    keep, gain, merge = hook.select(ctx)
    positions = torch.arange(L).unsqueeze(0)
    h, _, pos, vis, _, _ = _drop_visual(out, ctx.attention_mask, positions, visual, (text, ctx.text_valid), keep, gain,
                                        merge)
    assert pos[0, vis[0]].tolist() == kept_ref  # original positions of the kept places
    assert torch.allclose(h[0, vis[0]], hidden_ref, atol=1e-6)
    assert torch.equal(h[0, :s], out[0, :s]) and torch.equal(h[0, -text.shape[1]:], out[0, s + n:])
    assert hook.last_keep.shape == (1, nums)


def test_tokencarve_budget_range():
    from robustvtc.compression import get_compressor
    from robustvtc.errors import UserInputError

    assert tokencarve.max_budget(576) == 384 and tokencarve.max_budget(144) == 96
    with pytest.raises(UserInputError, match="accepted: 2..96"):
        get_compressor("tokencarve").bind(97, 144, 4)


# ---------------------------------------------------------------------------------------------- not registered
SEEDS = {"floc", "llava_zip", "vflowopt", "hidrop", "simignore", "gsearch_psigmoid", "look_m",
         "cdpruner"}


def test_seed_methods_not_registered_are_listed_with_a_reason():
    assert set(NOT_REGISTERED) >= SEEDS
    assert not set(NOT_REGISTERED) & set(COMPRESSORS.names("*"))
    assert all(isinstance(r, str) and len(r) > 40 for r in NOT_REGISTERED.values())


def test_list_compressors_prints_fidelity_and_the_unregistered_seeds():
    result = CliRunner().invoke(main, ["list", "compressors"])
    assert result.exit_code == 0, result.output
    table, _, rest = result.output.partition("not registered")
    assert "fidelity" in table.splitlines()[0]
    for name in SEEDS:
        assert f"{name}:" in rest
    filtered = CliRunner().invoke(main, ["list", "compressors", "fast*"]).output
    assert "fastv" in filtered and "not registered" not in filtered  # a pattern lists only what matches


@pytest.mark.parametrize("name", sorted(COMPRESSORS.names("*")))
def test_every_registered_compressor_states_its_fidelity(name):
    assert COMPRESSORS.get(name).fidelity.strip()


def test_fastervlm_keeps_the_top_head_mean_cls_attention_in_raster_order():
    from robustvtc.compression import get_compressor
    from robustvtc.models.base import LayerSignals, VisualTokens

    a = torch.tensor([0.0, 3.0, 1.0, 5.0, 2.0, 4.0, 0.5, 0.0, 0.0])  # head 0's CLS logits
    b = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 9.0, 0.0, 0.0])  # head 1 puts nearly all on patch 6
    q, k = torch.zeros(1, 2, 10, 2), torch.zeros(1, 2, 10, 2)
    q[..., 0] = 1.0
    k[0, 0, 1:, 0], k[0, 1, 1:, 0] = a, b
    tokens = VisualTokens(torch.randn(1, 9, 4), torch.randn(1, 4), (3, 3), 2, {2: LayerSignals(q, k, 1.0)}, 4)
    mean = (torch.cat([torch.zeros(1), a]).softmax(0) + torch.cat([torch.zeros(1), b]).softmax(0))[1:] / 2
    plan = get_compressor("fastervlm").plan(tokens, 4)
    # head mean: 6 (head 1's peak) then 3 > 5 > 1 by head 0; neither head alone gives this set
    assert sorted(mean.topk(4).indices.tolist()) == [1, 3, 5, 6]
    assert plan.primary_sources().tolist() == [[1, 3, 5, 6]]
