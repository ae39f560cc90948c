"""Attack contracts and behaviour on the tiny random-weight built-in architecture (few steps, two images)."""
from __future__ import annotations

import math

import pytest
import torch

from robustvtc.attacks import (ATTACKS, CAGE, Attack, EncoderAttack, FullToken, ThreatModel, WhiteBox, get_attack,
                               list_attacks, parse_eps)
from robustvtc.attacks.base import COMMON_DEFAULTS
from robustvtc.attacks.cage import rank_distortion_alignment, survival_probability
from robustvtc.data.synthetic import ANSWERS, to_pixels
from robustvtc.errors import UserInputError
from robustvtc.target import Target

EPS = 8 / 255


@pytest.fixture(scope="module")
def batch(samples):
    chunk = samples[:2]
    return to_pixels(chunk), [s.question for s in chunk], [s.answer for s in chunk]


@pytest.fixture(scope="module")
def compressed(tiny_adapter):
    return Target(tiny_adapter, "fastervlm", 16)


def _norms(result, clean):
    delta = (result.adv - clean).flatten(1)
    return delta.abs().amax(dim=1), delta.norm(dim=1)


# ---------------------------------------------------------------- ε parsing and option errors
@pytest.mark.parametrize("text, value", [("8/255", 8 / 255), (" 2 / 255 ", 2 / 255), ("2.5/255", 2.5 / 255),
                                         ("0.5", 0.5), (0.03, 0.03), (0, 0.0)])
def test_parse_eps_accepts_fractions_and_numbers(text, value):
    assert parse_eps(text) == pytest.approx(value, abs=1e-12)


@pytest.mark.parametrize("bad", ["abc", "1/0", "-0.1", -1, "nan", "inf", True, None, [8]])
def test_parse_eps_rejects_with_one_line(bad):
    with pytest.raises(UserInputError) as info:
        parse_eps(bad)
    assert "\n" not in str(info.value) and "eps" in str(info.value)


@pytest.mark.parametrize("kwargs, needle", [
    ({"eps": "2"}, "exceeds 1"), ({"norm": "L3"}, "norm"), ({"steps": -1}, "steps"), ({"eot_samples": 0}, "eot"),
    ({"epsilon": 0.1}, "unknown option"), ({"alpha": "x"}, "alpha"), ({"k_min": 50, "k_max": 10}, "k_min"),
])
def test_bad_options_raise_user_errors(tiny_adapter, kwargs, needle):
    with pytest.raises(UserInputError, match=needle):
        CAGE(tiny_adapter, **kwargs)


def test_string_eps_equals_float_eps(tiny_adapter, batch):
    clean, *_ = batch
    a = FullToken(tiny_adapter, eps="8/255", steps=1)(clean).adv
    b = FullToken(tiny_adapter, eps=8 / 255, steps=1)(clean).adv
    assert torch.equal(a, b)


def test_l2_eps_above_one_is_allowed(tiny_adapter):
    assert FullToken(tiny_adapter, norm="l2", eps=2.0).eps == 2.0


# ---------------------------------------------------------------- registry and metadata (every attack)
def test_registry_lists_and_builds(tiny_adapter):
    assert set(list_attacks()) >= {"fulltoken", "cage", "known_budget", "whitebox", "stealth"}
    assert isinstance(get_attack("cage", tiny_adapter), CAGE)
    with pytest.raises(UserInputError, match="accepted"):
        get_attack("nope", tiny_adapter)


@pytest.mark.parametrize("name", sorted(ATTACKS.names()))
def test_every_attack_declares_threat_model_and_repr(name, compressed):
    cls = ATTACKS.get(name)
    assert isinstance(cls.threat, ThreatModel) and cls.threat.gradients in ("encoder", "model")
    assert issubclass(cls, EncoderAttack) == (cls.threat.gradients == "encoder")
    atk = cls(compressed)
    text = repr(atk)
    for key in [*atk._own_parameters(), *COMMON_DEFAULTS]:
        assert f"{key}=" in text


@pytest.mark.parametrize("norm, eps", [("Linf", "8/255"), ("L2", 0.5)])
@pytest.mark.parametrize("name", sorted(ATTACKS.names()))
def test_every_attack_respects_the_ball_and_box(name, norm, eps, compressed, batch):
    clean, questions, answers = batch
    atk = get_attack(name, compressed, eps=eps, norm=norm, steps=2, random_start=True)
    result = atk(clean, questions, answers)
    linf, l2 = _norms(result, clean)
    bound = parse_eps(eps)
    assert bool((linf <= bound + 1e-6).all()) if norm == "Linf" else bool((l2 <= bound + 1e-5).all())
    assert linf.max() > 0  # it did move
    assert result.adv.min() >= 0 and result.adv.max() <= 1
    assert result.loss_trace.shape == (3, 2) and result.best_loss.shape == (2,)
    assert result.metadata["threat_model"]["gradients"] == type(atk).threat.gradients
    assert result.metadata["params"]["norm"] == norm


# ---------------------------------------------------------------- the loop
def test_deterministic_under_seed(tiny_adapter, batch):
    clean, *_ = batch
    run = lambda seed: FullToken(tiny_adapter, steps=2, seed=seed)(clean).adv  # noqa: E731
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_best_iterate_is_the_best(tiny_adapter, batch):
    clean, *_ = batch
    atk = FullToken(tiny_adapter, steps=4, alpha=EPS * 1.5)  # large steps: the objective need not rise monotonically
    result = atk(clean)
    assert torch.equal(result.best_loss, result.loss_trace.max(dim=0).values)
    assert torch.equal(result.best_step, result.loss_trace.argmax(dim=0))
    state = atk.prepare(clean, None, None, None)
    _, again = atk.gradient(clean, result.adv - clean, state, need_grad=False)
    assert torch.allclose(again, result.best_loss, atol=1e-5)


@pytest.mark.parametrize("norm, eps", [("Linf", "2.5/255"), ("L2", 0.3)])
def test_quantisation_gives_8bit_images_inside_the_ball(tiny_adapter, batch, norm, eps):
    clean, *_ = batch
    atk = FullToken(tiny_adapter, eps=eps, norm=norm, steps=2, quantize=True)
    result = atk(clean)
    scaled = result.adv * 255
    assert torch.allclose(scaled, scaled.round(), atol=1e-3)
    linf, l2 = _norms(result, clean)
    assert bool((linf <= parse_eps(eps) + 1e-6).all()) if norm == "Linf" else bool((l2 <= parse_eps(eps) + 1e-5).all())
    state = atk.prepare(clean, None, None, None)
    assert torch.allclose(atk.gradient(clean, result.adv - clean, state, need_grad=False)[1], result.best_loss)


def test_quantisation_needs_clean_pixels_on_the_grid(tiny_adapter, batch):
    clean, *_ = batch
    with pytest.raises(UserInputError, match="8-bit grid"):
        FullToken(tiny_adapter, quantize=True)((clean + 0.3 / 255).clamp(0, 1))


def test_batch_and_label_mismatch_errors(tiny_adapter, compressed, batch):
    clean, questions, answers = batch
    with pytest.raises(UserInputError, match="questions"):
        WhiteBox(compressed)(clean, questions[:1], answers)
    with pytest.raises(UserInputError, match="answers"):
        WhiteBox(compressed)(clean, questions)
    with pytest.raises(UserInputError, match="compressed target"):
        get_attack("stealth", tiny_adapter)
    with pytest.raises(UserInputError, match="budget"):
        get_attack("known_budget", tiny_adapter)


def test_eps_zero_returns_the_clean_image(tiny_adapter, batch):
    clean, *_ = batch
    assert torch.equal(FullToken(tiny_adapter, eps=0, steps=2)(clean).adv, clean)


# ---------------------------------------------------------------- CAGE
def test_cage_survival_probability_matches_closed_form():
    rank = torch.tensor([[0, 3, 4, 10, 26, 47, 48, 100]])
    expected = [1, 1, 1, (48 - 10) / 44, (48 - 26) / 44, 1 / 44, 0, 0]
    assert torch.allclose(survival_probability(rank, 4, 48), torch.tensor([expected]))


def test_cage_budget_interval_scales_with_token_count(tiny_adapter):
    atk = CAGE(tiny_adapter)
    assert tiny_adapter.num_visual_tokens == 144 and (atk.k_min, atk.k_max) == (4, 48)
    assert atk.steps == 100 and atk.random_start is False and (atk.lambda_efd, atk.lambda_rda) == (0.005, 1.0)
    assert atk.alpha == pytest.approx(atk.eps / 4)


def test_cage_rda_is_zero_for_uniform_scores_and_pushes_damaged_tokens_up():
    distortion = torch.tensor([[0.1, 0.9, 0.2, 0.3]])
    assert rank_distortion_alignment(distortion, torch.ones(1, 4)).abs().max() < 1e-6
    scores = torch.tensor([[0.4, 0.1, 0.3, 0.2]], requires_grad=True)
    rank_distortion_alignment(distortion, scores).sum().backward()
    assert scores.grad.argmax() == 1  # ascent raises the importance of the most distorted token


def test_cage_objective_increases(tiny_adapter, batch):
    clean, *_ = batch
    result = CAGE(tiny_adapter, steps=5)(clean)
    assert bool((result.loss_trace[-1] > result.loss_trace[0] + 0.01).all())
    assert bool((result.best_loss >= result.loss_trace[-1]).all())


def test_cage_step_uses_only_encoder(tiny_adapter, batch, monkeypatch):
    clean, *_ = batch

    def forbidden(*args, **kwargs):
        raise AssertionError("a grey-box attack ran the LLM")

    monkeypatch.setattr(tiny_adapter, "hidden_states", forbidden)
    monkeypatch.setattr(tiny_adapter, "project", forbidden)
    CAGE(tiny_adapter, steps=1)(clean)


# ---------------------------------------------------------------- EOT and white-box
def test_eot_gradient_is_the_average_over_draws(tiny_adapter, batch):
    clean, questions, answers = batch
    delta = torch.zeros_like(clean)
    eot = WhiteBox(Target(tiny_adapter, "random", 16, seed=3), eot_samples=3)
    state = eot.prepare(clean, questions, answers, None)
    grad3, loss3 = eot.gradient(clean, delta, state)
    single = WhiteBox(Target(tiny_adapter, "random", 16, seed=3), eot_samples=1)  # same draw sequence
    draws = [single.gradient(clean, delta, state) for _ in range(3)]
    assert not torch.allclose(draws[0][0], draws[1][0])  # the target really is random
    assert torch.allclose(grad3, sum(g for g, _ in draws) / 3, atol=1e-6)
    assert torch.allclose(loss3, sum(v for _, v in draws) / 3, atol=1e-5)


def test_targeted_whitebox_raises_target_logprob(tiny_adapter, batch):
    clean, questions, answers = batch
    goal = ["yes" if a != "yes" else "no" for a in answers]
    full = Target(tiny_adapter)
    result = WhiteBox(full, path="full", steps=5)(clean, questions, target_answers=goal)
    idx = torch.tensor([ANSWERS.index(g) for g in goal])
    with torch.no_grad():
        before = full.candidate_logprobs(clean, questions, ANSWERS).gather(1, idx[:, None])
        after = full.candidate_logprobs(result.adv, questions, ANSWERS).gather(1, idx[:, None])
    assert bool((after > before + 0.05).all())
    assert result.metadata["targeted"] is True


def test_untargeted_whitebox_through_compressor_raises_answer_loss(compressed, batch):
    clean, questions, answers = batch
    result = WhiteBox(compressed, steps=3)(clean, questions, answers)
    with torch.no_grad():
        before = compressed.answer_loss(clean, questions, answers)
        after = compressed.answer_loss(result.adv, questions, answers)
    assert bool((after > before).all())


def test_stealth_hurts_compressed_more_than_full(compressed, tiny_adapter, batch):
    clean, questions, answers = batch
    result = get_attack("stealth", compressed, steps=4)(clean, questions, answers)
    full = Target(tiny_adapter)
    with torch.no_grad():
        def rise(target):
            return target.answer_loss(result.adv, questions, answers) - target.answer_loss(clean, questions, answers)

        rise_c, rise_f = rise(compressed), rise(full)
    assert bool((rise_c > rise_f).all()) and bool((rise_c > 0).all())


def test_base_class_is_abstract(tiny_adapter, batch):
    clean, *_ = batch

    class Bare(Attack):
        name = "bare"
        threat = ThreatModel("encoder", False, False, False)

    with pytest.raises(NotImplementedError):
        Bare(tiny_adapter, steps=1)(clean)
    assert math.isclose(Bare(tiny_adapter).alpha, EPS / 4)


def test_whitebox_relaxation_follows_the_compressor(tiny_adapter, compressed, batch):
    if not getattr(compressed.compressor, "relaxable", False):
        pytest.skip("fastervlm offers no relaxation in this tree")
    assert WhiteBox(compressed).gradient_target.compressor.relaxation == "straight_through"
    assert WhiteBox(compressed, relaxation=None).gradient_target is compressed
    assert WhiteBox(compressed, relaxation="soft_topk").gradient_target.compressor.relaxation == "soft_topk"
    with pytest.raises(UserInputError, match="no differentiable relaxation"):
        WhiteBox(Target(tiny_adapter, "random", 16), relaxation="soft_topk")
    clean, questions, answers = batch
    delta = torch.zeros_like(clean)
    grads = []
    for relaxation in (None, "straight_through"):
        atk = WhiteBox(compressed, relaxation=relaxation)
        grad, loss = atk.gradient(clean, delta, atk.prepare(clean, questions, answers, None))
        grads.append((grad, loss))
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-5)  # straight-through keeps the exact forward
    assert not torch.allclose(grads[0][0], grads[1][0])  # but its backward reaches the importance scores
