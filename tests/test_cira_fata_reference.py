"""CIRA and FATA objectives pinned to independent re-statements of the papers' formulas on fixed tensors.

No official code of either paper was found, so the reference here is each paper's text, re-written
element by element (plain Python loops over tokens and over budgets, numpy, no code shared with the
attacks): CIRA arXiv 2609.35002 eq. 4-9 and Algorithm 1; FATA arXiv 2609.39134 eq. 1-4 and Algorithm 2.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from robustvtc.attacks import CIRA, FATA, get_attack
from robustvtc.attacks.base import descending_rank
from robustvtc.attacks.cira import cira_objective, displacement_weights
from robustvtc.attacks.fata import fata_loss, target_set
from robustvtc.data.synthetic import to_pixels
from robustvtc.target import Target


def _fixed(seed: int, b: int = 2, n: int = 20, d: int = 6):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, n, generator=g, dtype=torch.float64), torch.rand(b, n, generator=g, dtype=torch.float64),
            torch.randn(b, n, d, generator=g, dtype=torch.float64), torch.randn(b, n, d, generator=g, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------- CIRA, by the paper
def _rank_desc(s):  # 1 = highest
    order = sorted(range(len(s)), key=lambda i: (-s[i], i))
    r = [0] * len(s)
    for pos, i in enumerate(order):
        r[i] = pos + 1
    return r


def _z(u, eps):  # eq. 4
    u = np.asarray(u, float)
    c = u - u.mean()
    return c / max(np.linalg.norm(c) / math.sqrt(len(u)), eps)


def _cira_paper(s_a, s_c, h_a, h_c, k_min, k_max, lam, eps_s=1e-6, eps_h=1e-6):
    n = len(s_c)
    r_c, r_a = _rank_desc(s_c), _rank_desc(s_a)
    inv = [(r - 1) / (n - 1) for r in r_c]                                     # R(s^c), eq. 4
    gsh = float(np.dot(_z(s_a, eps_s), _z(inv, eps_s)) / n)                    # eq. 5
    budgets = range(k_min, k_max + 1)                                          # K ~ U{K_min..K_max}
    w = [sum(1 for k in budgets if r_c[i] <= k < r_a[i]) / len(budgets) for i in range(n)]  # eq. 6 by counting
    d = []
    for i in range(n):                                                         # eq. 7
        a, c = np.asarray(h_a[i]), np.asarray(h_c[i])
        d.append(0.5 * (1 - float(a @ c / (np.linalg.norm(a) * np.linalg.norm(c)))))
    hep = -sum(wi * di for wi, di in zip(w, d)) / max(sum(w), eps_h)            # eq. 8
    return gsh + lam * hep                                                     # eq. 9


@pytest.mark.parametrize("seed,k_min,k_max,lam", [(0, 4, 12, 0.8), (1, 1, 20, 0.8), (2, 5, 5, 1.0), (3, 3, 9, 0.0)])
def test_cira_objective_matches_the_papers_formula(seed, k_min, k_max, lam):
    s_a, s_c, h_a, h_c = _fixed(seed)
    ours = cira_objective(s_a, s_c, h_a, h_c, k_min, k_max, lam)
    for b in range(s_a.shape[0]):
        ref = _cira_paper(s_a[b].tolist(), s_c[b].tolist(), h_a[b].numpy(), h_c[b].numpy(), k_min, k_max, lam)
        assert ours[b].item() == pytest.approx(ref, abs=1e-6)


def test_cira_weights_closed_form_equals_counting_budgets():
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        r_c = torch.randperm(30, generator=g) + 1
        r_a = torch.randperm(30, generator=g) + 1
        w = displacement_weights(r_c, r_a, 6, 17)
        counted = [sum(1 for k in range(6, 18) if r_c[i] <= k < r_a[i]) / 12 for i in range(30)]
        assert w.tolist() == pytest.approx(counted)


def test_cira_hand_example():
    # 4 tokens; clean priority order 0 > 1 > 2 > 3, adversarial order reversed: 3 > 2 > 1 > 0
    s_c = torch.tensor([[4.0, 3.0, 2.0, 1.0]], dtype=torch.float64)
    s_a = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    assert (descending_rank(s_c, stable=True) + 1).tolist() == [[1, 2, 3, 4]]
    # r_c = (1,2,3,4), r_a = (4,3,2,1); K in {1,2}: token 0 hidden at K=1,2 (1<=K<4); token 1 at K=2 (2<=K<3)
    assert displacement_weights(torch.tensor([1, 2, 3, 4]), torch.tensor([4, 3, 2, 1]), 1, 2).tolist() == [1.0, 0.5,
                                                                                                           0.0, 0.0]
    h = torch.eye(4, dtype=torch.float64).unsqueeze(0)
    # a perfect inversion: GSH = 1 (the standardised vectors coincide); no drift: HEP = 0
    assert cira_objective(s_a, s_c, h, h, 1, 2, 0.8).item() == pytest.approx(1.0)
    h_a = h.clone()
    h_a[0, 0] = torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64)  # token 0 orthogonal: d_0 = 1/2
    # HEP = -(1 * 0.5 + 0.5 * 0) / 1.5 = -1/3
    assert cira_objective(s_a, s_c, h_a, h, 1, 2, 0.8).item() == pytest.approx(1.0 - 0.8 / 3)


# ---------------------------------------------------------------------------------------------- FATA, by the paper
def _fata_paper(s_c, s_a, h_a, h_c, m, lam):
    targets = sorted(range(len(s_c)), key=lambda i: -s_c[i])[:m]               # eq. 1
    l_attn = sum(s_a[i] for i in targets)                                      # eq. 2
    cos = [float(np.asarray(h_a[i]) @ np.asarray(h_c[i]) / (np.linalg.norm(h_a[i]) * np.linalg.norm(h_c[i])))
           for i in targets]
    l_sem = 1 - sum(cos) / len(targets)                                         # eq. 3
    return l_attn + lam * l_sem                                                 # eq. 4


@pytest.mark.parametrize("seed,m,lam", [(0, 5, 1.0), (1, 1, 1.0), (2, 20, 0.5), (3, 7, 0.0)])
def test_fata_loss_matches_the_papers_formula(seed, m, lam):
    s_a, s_c, h_a, h_c = _fixed(seed)
    ours = fata_loss(s_a, h_a, h_c, target_set(s_c, m), lam)
    for b in range(s_a.shape[0]):
        ref = _fata_paper(s_c[b].tolist(), s_a[b].tolist(), h_a[b].numpy(), h_c[b].numpy(), m, lam)
        assert ours[b].item() == pytest.approx(ref, abs=1e-6)


# ---------------------------------------------------------------------------------------------- the attacks
def test_defaults_are_the_papers(tiny_adapter):
    cira, fata = CIRA(tiny_adapter), FATA(tiny_adapter)
    assert (cira.eps, cira.alpha, cira.steps, cira.random_start, cira.lam) == (4 / 255, 1 / 255, 100, False, 0.8)
    assert (cira.k_min, cira.k_max) == (8, 48)  # [32, 192] of 576, scaled to 144 tokens
    assert cira.layers == (3, 1)  # (-1, -3, -5) of a 4-layer encoder: layer -5 does not exist
    assert (fata.eps, fata.alpha, fata.steps, fata.random_start, fata.lam, fata.m) == (2 / 255, 0.5 / 255, 100, True,
                                                                                       1.0, 16)
    assert CIRA.role == FATA.role == "stealth" and not CIRA.threat.uses_question and FATA.threat.gradients == "encoder"


@pytest.mark.parametrize("name", ["cira", "fata"])
def test_attacks_raise_their_objective(tiny_adapter, samples, name):
    clean = to_pixels(samples[:2])
    result = get_attack(name, tiny_adapter, eps="8/255", alpha="2/255", steps=4)(clean)
    assert (result.best_loss >= result.loss_trace[0] - 1e-6).all()
    assert (result.best_loss > result.loss_trace[0]).any()
    assert (result.adv - clean).abs().max() <= 8 / 255 + 1e-6


def test_adaptive_cira_averages_over_the_consensus_views(tiny_adapter, samples):
    clean = to_pixels(samples[:1])
    defended = Target(tiny_adapter, "fastervlm", 16, defenses=[{"translation_consensus": {"views": 2}}])
    attack = CIRA(defended, steps=1)
    assert attack._views == [(0, 0), (2, 2), (-2, -2)]  # 7/336 of 96 px -> 2 px, diagonal shifts first
    state = attack.prepare(clean, None, None, None)
    per_view = []
    for (dy, dx), (s_c, h_c) in zip(attack._views, state):
        s_a, h_a = attack_scores_features(attack, clean, dy, dx)
        per_view.append(cira_objective(s_a, s_c, h_a, h_c, attack.k_min, attack.k_max))
    assert attack.objective(clean, state).item() == pytest.approx(torch.stack(per_view).mean().item(), abs=1e-6)
    assert CIRA(defended, adaptive=False)._views is None and CIRA(Target(tiny_adapter, "fastervlm", 16))._views is None


def attack_scores_features(attack, pixels, dy, dx):
    from robustvtc.attacks.cira import priority_scores
    from robustvtc.defenses.translation_consensus import shift_pixels

    tokens = tiny_view(attack).encode(shift_pixels(pixels, dy, dx), attack.layers)
    return priority_scores(tokens, attack.layers), tokens.features


def tiny_view(attack):
    return Target(attack.adapter, attack.target.compressor, attack.target.budget)
