"""CAGE's objective pinned to the official code's formula (XinweiZhang1998/CAGE, attacker_TextVQA_caa.py).

``official`` below re-states, for one image, the operations of the official ``get_survival_probs``,
``expected_feature_divergence``, ``rda_kl_align`` and the total ``lambda_div * L_div + lambda_attr * L_align``
in the order that code runs them, independently of robustvtc's implementation. robustvtc's ``reduce`` must
give the same value and the same gradients w.r.t. the distortion and the importance scores.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from robustvtc.attacks import CAGE
from robustvtc.attacks.cage import descending_rank, survival_probability

K_MIN, K_MAX = 4, 20


def official(d: torch.Tensor, s: torch.Tensor, k_min: int, k_max: int, lambda_div: float, lambda_attr: float,
             eps_std: float = 0.0, uniform_target: bool = False) -> torch.Tensor:
    """One image: d, s are 1-D [P]. ``eps_std`` = 1e-6 reproduces robustvtc's former z-score (std + 1e-6);
    ``uniform_target`` replaces softmax(d_hat) by 1/P (what the guard gives for a constant d)."""
    # get_survival_probs
    ranks = torch.argsort(torch.argsort(s, descending=True))
    probs = (k_max - ranks.float()) / (k_max - k_min + 1e-6)
    probs = torch.clamp(probs, 0.0, 1.0).detach()
    # expected_feature_divergence
    l_div = (d * probs).sum() / (probs.sum() + 1e-6)
    # rda_kl_align(detach_d=True, normalize=True)
    d32 = d.detach().float()
    s32 = s.float()
    d_hat = (d32 - d32.mean()) / (d32.std(unbiased=False) + eps_std)
    s_hat = (s32 - s32.mean()) / (s32.std(unbiased=False) + eps_std)
    p_d = torch.full_like(d32, 1 / d32.numel()) if uniform_target else torch.softmax(d_hat, dim=0)
    log_p_s = torch.log_softmax(s_hat, dim=0)
    raw = (p_d * log_p_s).sum()
    P = s.numel()
    denom = np.log(P) if P > 1 else 1.0
    l_align = (raw + denom) / denom
    return lambda_div * l_div + lambda_attr * l_align


def official_batch(d, s, lambda_div, lambda_attr, eps_std=0.0, uniform_target=False):
    """Value (B,) and gradients w.r.t. d and s, one image at a time as the official loop runs them."""
    values, gd, gs = [], [], []
    for di, si in zip(d, s):
        di, si = di.clone().requires_grad_(True), si.clone().requires_grad_(True)
        loss = official(di, si, K_MIN, K_MAX, lambda_div, lambda_attr, eps_std, uniform_target)
        loss.backward()
        values.append(loss.detach())
        gd.append(di.grad)
        gs.append(si.grad)
    return torch.stack(values), torch.stack(gd), torch.stack(gs)


def ours(attack: CAGE, d: torch.Tensor, s: torch.Tensor):
    """robustvtc's ``reduce`` on the same tensors (the scores handed over as the tokens' CLS attention)."""
    d, s = d.clone().requires_grad_(True), s.clone().requires_grad_(True)
    tokens = SimpleNamespace(cls_attention=lambda layer, reduce: s)
    value = attack.reduce(tokens, d)
    value.sum().backward()
    # lambda_rda = 0 skips L_RDA, so nothing reaches s: the official code's gradient there is 0 * (...) = 0
    return value.detach(), d.grad, torch.zeros_like(s) if s.grad is None else s.grad


def close(a, b):
    """Equal up to float32 rounding: the values come out bit-identical here; a gradient entry near 0 may differ
    in the last bits of the row's largest entry (batched vs one-image reductions)."""
    return torch.allclose(a, b, rtol=1e-6, atol=1e-7 * float(b.abs().max()) + 1e-12)


@pytest.fixture(scope="module")
def fixed():
    """Hand-built (B=3, N=32) distortion in [0, 2] and distinct CLS-attention-like scores (no rank ties)."""
    g = torch.Generator().manual_seed(1234)
    d = torch.rand(3, 32, generator=g) * 0.6
    d[1, :5] = torch.tensor([1.9, 1.5, 0.0, 0.02, 1.2])  # wide spread in one row
    s = torch.randperm(96, generator=g).float().view(3, 32) / 96 * 0.05 + 1e-3
    s[2] = s[2].softmax(dim=0)  # a row that sums to 1, as attention does
    return d, s


def attack(tiny_adapter, **kwargs):
    return CAGE(tiny_adapter, k_min=K_MIN, k_max=K_MAX, **kwargs)


def test_cage_defaults_are_the_official_readme_command(tiny_adapter):
    atk = CAGE(tiny_adapter)
    assert atk.eps == pytest.approx(2 / 255) and atk.alpha == pytest.approx(0.5 / 255)
    assert atk.steps == 100 and atk.random_start is False and atk.norm == "Linf"
    assert (atk.lambda_efd, atk.lambda_rda) == (0.005, 1.0)
    assert atk.layer is None and atk.score == "attention"  # the feature layer's head-mean CLS attention
    assert tiny_adapter.num_visual_tokens == 144 and (atk.k_min, atk.k_max) == (4, 48)  # [16, 192] of 576


def test_cage_survival_probability_is_the_official_soft_rank_mask(fixed):
    _, s = fixed
    pi = survival_probability(descending_rank(s), K_MIN, K_MAX)
    for row, p in zip(s, pi):
        ranks = torch.argsort(torch.argsort(row, descending=True))
        assert torch.equal(p, ((K_MAX - ranks.float()) / (K_MAX - K_MIN + 1e-6)).clamp(0, 1))
    assert torch.allclose(pi.sum(dim=-1), torch.full((3,), 12.5))  # ranks 0-4 give 1, ranks 5-19 give 15/16 ... 1/16


@pytest.mark.parametrize("lambdas", [(0.005, 1.0), (1.0, 200.0), (1.0, 0.005), (1.0, 0.0)],
                         ids=["readme", "paper-lambda200", "efd-heavy", "efd-only"])
def test_cage_objective_and_gradients_equal_the_official_formula(tiny_adapter, fixed, lambdas):
    d, s = fixed
    value, gd, gs = ours(attack(tiny_adapter, lambda_efd=lambdas[0], lambda_rda=lambdas[1]), d, s)
    ref_value, ref_gd, ref_gs = official_batch(d, s, *lambdas)
    assert close(value, ref_value), (value, ref_value)
    assert close(gd, ref_gd) and close(gs, ref_gs)


def test_cage_readme_weights_are_the_paper_form_with_lambda_200(tiny_adapter, fixed):
    d, s = fixed
    readme = ours(attack(tiny_adapter), d, s)
    paper = ours(attack(tiny_adapter, lambda_efd=1.0, lambda_rda=200.0), d, s)
    assert torch.allclose(paper[0], 200 * readme[0], rtol=1e-5)
    for a, b in zip(readme[1:], paper[1:]):  # same sign step: the same PGD iterates
        assert torch.equal(torch.sign(a), torch.sign(b))


def test_cage_zero_start_step_equals_the_official_computation(tiny_adapter, fixed):
    """δ = 0: the features equal the clean ones, so d is 1 - cos(z, z): exactly 0, up to float32 rounding.

    In float32 it is rounding noise (multiples of 2**-24, |d| < 3e-7). The official z-score divides that
    noise by its own tiny std, so the first step's RDA target is the normalised noise pattern; the former
    ``std + 1e-6`` shrank it to an almost uniform target and so took a different first step. The new code
    takes the official one.
    """
    _, s = fixed
    g = torch.Generator().manual_seed(7)
    noise = torch.randint(-4, 5, (3, 32), generator=g).float() * 2.0 ** -24
    value, gd, gs = ours(attack(tiny_adapter), noise, s)
    ref_value, ref_gd, ref_gs = official_batch(noise, s, 0.005, 1.0)
    assert close(value, ref_value) and close(gd, ref_gd) and close(gs, ref_gs)
    assert torch.equal(torch.sign(gs), torch.sign(ref_gs))
    _, _, old_gs = official_batch(noise, s, 0.005, 1.0, eps_std=1e-6)
    assert not torch.equal(torch.sign(old_gs), torch.sign(ref_gs))  # what the +1e-6 changed


def test_cage_zero_spread_guard_where_the_official_code_gives_nan(tiny_adapter, fixed):
    """d exactly 0 on every token (std 0): the official z-score is 0/0, so its loss and its gradient w.r.t.
    the scores are NaN (the gradient w.r.t. d is finite: only the EFD term, RDA detaches d), and its sign
    step would write NaN into δ. The guard replaces the zero std by 1: z(d) = 0, a uniform RDA target. The
    result equals the official formula with that uniform target put in place of softmax(d_hat)."""
    _, s = fixed
    zero = torch.zeros(3, 32)
    ref_value, ref_gd, ref_gs = official_batch(zero, s, 0.005, 1.0)
    assert torch.isnan(ref_value).all() and torch.isnan(ref_gs).all() and torch.isfinite(ref_gd).all()

    value, gd, gs = ours(attack(tiny_adapter), zero, s)
    assert torch.isfinite(value).all() and torch.isfinite(gd).all() and torch.isfinite(gs).all()
    assert close(gd, ref_gd)  # the EFD part is untouched: 0.005 * pi / (sum pi + 1e-6)
    s_hat = (s - s.mean(-1, keepdim=True)) / s.std(-1, keepdim=True, unbiased=False)
    uniform = (torch.log_softmax(s_hat, dim=-1).mean(dim=-1) + np.log(32)) / np.log(32)
    assert close(value, uniform)  # EFD is 0 at d = 0
    _, _, uniform_gs = official_batch(zero, s, 0.005, 1.0, uniform_target=True)
    assert close(gs, uniform_gs)

    # a constant score vector (std 0) is guarded the same way: z(s) = 0, L_RDA = 0, no NaN anywhere
    d, flat = fixed[0], torch.full((3, 32), 1 / 32)
    assert torch.isnan(official_batch(d, flat, 0.005, 1.0)[0]).all()
    value, gd, gs = ours(attack(tiny_adapter), d, flat)
    pi = survival_probability(descending_rank(flat), K_MIN, K_MAX)
    # L_RDA = (sum p_d * (-log 32) + log 32) / log 32 = 0 up to float32 rounding of the sum
    assert torch.allclose(value, 0.005 * (d * pi).sum(-1) / (pi.sum(-1) + 1e-6), rtol=0, atol=1e-7)
    assert torch.isfinite(gd).all() and torch.isfinite(gs).all()


def test_cage_first_step_on_the_model_equals_the_official_computation(tiny_adapter):
    """The whole zero-start step through the encoder: robustvtc's gradient w.r.t. the pixels at δ = 0 against
    the official formula on the same encoder outputs (official distortion: 1 - <normalize(a), normalize(c)>)."""
    from robustvtc.data.synthetic import generate_dataset, to_pixels

    clean = to_pixels(generate_dataset(2, "test")).to(tiny_adapter.device)
    atk = CAGE(tiny_adapter, steps=1)
    state = atk.prepare(clean, None, None, None)
    grad, value = atk.gradient(clean, torch.zeros_like(clean), state)

    def reference(eps_std):
        x = clean.clone().requires_grad_(True)
        tokens = atk.encode(x)
        feats, scores = tokens.features.float(), tokens.cls_attention(None, reduce="mean").float()
        total = 0
        for f, c, sc in zip(feats, state, scores):
            d = 1.0 - (F.normalize(f, dim=-1) * F.normalize(c, dim=-1)).sum(dim=-1)
            total = total + official(d, sc, atk.k_min, atk.k_max, 0.005, 1.0, eps_std)
        total.backward()
        return x.grad, total.detach()

    (ref, ref_total), (old, _) = reference(0.0), reference(1e-6)
    assert torch.allclose(value.sum(), ref_total, rtol=1e-5)
    agree = lambda a, b: float((torch.sign(a) == torch.sign(b)).float().mean())  # noqa: E731
    assert torch.isfinite(grad).all() and agree(grad, ref) > 0.999  # the official first sign step
    assert agree(old, ref) < 0.9  # the former +1e-6 took a different first step (about 72 % agreement here)
