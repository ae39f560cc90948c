"""Defense declarations, hook points, adaptive evaluation and gradient-masking sanity checks.

Everything runs on the tiny random-weight built-in architecture with two images (a few seconds in all),
except the hand-made cases, which check closed forms.
"""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from robustvtc.attacks import get_attack
from robustvtc.compression.base import KeepPlan, topk_sorted
from robustvtc.data.synthetic import ANSWERS, to_pixels
from robustvtc.defenses import (DEFENSES, HOOKS, DetectionDefense, InputDefense, ScoreDefense, adaptive_attack_options,
                                build_defenses, detection_rates, get_defense)
from robustvtc.defenses.ensemble import primary_votes
from robustvtc.defenses.jpeg import jpeg_round_trip
from robustvtc.defenses.translation_consensus import align_scores, shift_pixels
from robustvtc.errors import UserInputError
from robustvtc.campaign.masking import Thresholds, report_sections, sanity_checks, unreliable
from robustvtc.target import Target

ALL = DEFENSES.names()


@pytest.fixture(scope="module")
def batch(samples):
    chunk = samples[:2]
    return to_pixels(chunk), [s.question for s in chunk], [s.answer for s in chunk]


def _target(adapter, name: str, **kwargs) -> Target:
    return Target(adapter, "fastervlm", 16, defenses=[get_defense(name, **kwargs)])


def _draw(defense, target: Target, pixels: torch.Tensor) -> torch.Tensor:
    """One output of the defense at its own hook point."""
    if defense.hook == "input":
        return defense(pixels)
    tokens = target.adapter.encode(pixels, target.signal_layers)
    if defense.hook == "scores":
        return defense.bind(target, pixels, target.signal_layers)(tokens.cls_attention(), tokens, None, "mean")
    if defense.hook == "selection":
        return defense.plan(target.compressor, tokens, target.budget, target.adapter.project).weights
    if defense.hook == "output":
        return defense.aggregate(lambda p: p.flatten(1).mean(-1, keepdim=True), pixels)
    return defense.statistic(target, pixels)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b)


# ---------------------------------------------------------------- declarations and registry
@pytest.mark.parametrize("name", ALL)
def test_declaration_is_complete_and_repr_lists_every_hyperparameter(name):
    defense = get_defense(name)
    cls = type(defense)
    assert cls.hook in HOOKS and cls.name == name
    assert isinstance(defense.randomized, bool) and isinstance(cls.differentiable, bool)
    assert cls.differentiable or cls.bpda, "a non-differentiable defense must name its BPDA surrogate"
    assert defense.randomized == ("seed" in defense.hyperparameters()) or name == "ensemble"
    text = repr(defense)
    for key, value in defense.hyperparameters().items():
        assert f"{key}={value!r}" in text


def test_build_defenses_accepts_names_mappings_and_objects():
    jpeg = get_defense("jpeg", quality=50)
    forms = [["jpeg"], {"jpeg": {"quality": 50}}, [{"jpeg": {"quality": 50}}, "bit_depth"], jpeg, None]
    built = [build_defenses(f) for f in forms]
    assert [repr(d) for d in built[0]] == ["JPEG(quality=75)"]
    assert [repr(d) for d in built[1]] == ["JPEG(quality=50)"]
    assert [d.name for d in built[2]] == ["jpeg", "bit_depth"]
    assert built[3] == (jpeg,) and built[4] == ()


@pytest.mark.parametrize("spec, needle", [("nope", "unknown defense"), ({"jpeg": {"quality": 0}}, "quality"),
                                          ({"bit_depth": {"bits": 9}}, "bits"), ([3], "a defense is"),
                                          ({"score_smoothing": {"kernel": 2}}, "odd"),
                                          ({"random_budget": {"low": 1.0, "high": 0.5}}, "high")])
def test_bad_defense_specs_raise_one_line(spec, needle):
    with pytest.raises(UserInputError, match=needle) as info:
        build_defenses(spec)
    assert "\n" not in str(info.value)


def test_incompatible_targets_are_refused(tiny_adapter):
    with pytest.raises(UserInputError, match="does not rank"):
        Target(tiny_adapter, "fastv", 16, defenses=["score_noise"])
    with pytest.raises(UserInputError, match="pre-LLM"):
        Target(tiny_adapter, "fastv", 16, defenses=["random_budget"])
    with pytest.raises(UserInputError, match="one selection defense"):
        Target(tiny_adapter, "fastervlm", 16, defenses=["random_budget", "ensemble"])


def test_score_and_selection_defenses_are_no_ops_without_compression(tiny_adapter, batch):
    pixels, questions, _ = batch
    plain = Target(tiny_adapter).candidate_logprobs(pixels, questions, ANSWERS)
    full = Target(tiny_adapter, defenses=["score_noise", "random_budget"])
    assert not full.randomized
    assert torch.equal(full.candidate_logprobs(pixels, questions, ANSWERS), plain)


# ---------------------------------------------------------------- the target applies every defense
@pytest.mark.parametrize("name", ALL)
def test_every_defense_runs_in_a_target(tiny_adapter, batch, name):
    pixels, questions, _ = batch
    target = _target(tiny_adapter, name)
    assert repr(target).endswith(f"defenses=[{target.defenses[0]!r}])")
    if target.defenses[0].hook == "detection":
        target.defenses[0].calibrate(target, pixels, fpr=0.0)
        assert target.detect(pixels).tolist() == [False, False]
        return
    scores = target.candidate_logprobs(pixels, questions, ANSWERS)
    assert scores.shape == (2, len(ANSWERS)) and torch.isfinite(scores).all()


def test_no_defense_keeps_the_target_unchanged(tiny_adapter, batch):
    pixels, questions, answers = batch
    target = Target(tiny_adapter, "fastervlm", 16)
    assert repr(target) == "Target(builtin, fastervlm, budget=16)" and target.defenses == ()
    assert not target.randomized and target.differentiable
    tokens = tiny_adapter.encode(pixels)
    assert torch.equal(target.forward(pixels).plan.weights, target.forward(None, tokens).plan.weights)


@pytest.mark.parametrize("name", ALL)
def test_randomised_declaration_makes_the_target_randomised_and_triggers_eot(tiny_adapter, name):
    target = _target(tiny_adapter, name)
    assert target.randomized == target.defenses[0].randomized
    assert target.differentiable == type(target.defenses[0]).differentiable
    assert adaptive_attack_options(target) == {"eot_samples": 8 if target.randomized else 1}
    assert adaptive_attack_options(target, eot_samples=3)["eot_samples"] == (3 if target.randomized else 1)


def test_randomised_compressor_triggers_eot(tiny_adapter):
    assert adaptive_attack_options(Target(tiny_adapter, "random", 16)) == {"eot_samples": 8}


@pytest.mark.parametrize("name", [n for n in ALL if not DEFENSES.get(n).randomized])
def test_deterministic_defenses_repeat_exactly(tiny_adapter, batch, name):
    target = _target(tiny_adapter, name)
    pixels = batch[0]
    assert _same(_draw(target.defenses[0], target, pixels), _draw(target.defenses[0], target, pixels))


@pytest.mark.parametrize("name", [n for n in ALL if DEFENSES.get(n).randomized])
def test_randomised_defenses_differ_across_draws_and_repeat_under_a_seed(tiny_adapter, batch, name):
    pixels = batch[0]
    first, again = _target(tiny_adapter, name, seed=3), _target(tiny_adapter, name, seed=3)
    a1, a2 = _draw(first.defenses[0], first, pixels), _draw(first.defenses[0], first, pixels)
    assert not _same(a1, a2)
    assert _same(a1, _draw(again.defenses[0], again, pixels))
    other = _target(tiny_adapter, name, seed=4)
    assert not _same(a1, _draw(other.defenses[0], other, pixels))


# ---------------------------------------------------------------- input transforms and BPDA
@pytest.mark.parametrize("name", ["jpeg", "bit_depth"])
def test_bpda_gives_identity_gradients_through_non_differentiable_transforms(name, batch):
    defense = get_defense(name)
    x = batch[0].clone().requires_grad_(True)
    out = defense(x)
    assert not torch.allclose(out, x, atol=1e-4)  # the forward pass really transforms
    weights = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    assert torch.equal(grad, weights)


@pytest.mark.parametrize("name", ["jpeg", "bit_depth"])
def test_attack_gradients_reach_the_pixels_through_bpda(tiny_adapter, batch, name):
    pixels, questions, answers = batch
    target = _target(tiny_adapter, name)
    x = pixels.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(target.answer_loss(x, questions, answers).sum(), x)
    assert grad.abs().sum() > 0 and not target.differentiable


def test_jpeg_forward_is_a_real_pil_round_trip(batch):
    image = batch[0][:1]
    array = (image[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=40)
    expected = torch.from_numpy(np.asarray(Image.open(buffer).convert("RGB")).copy()).permute(2, 0, 1) / 255
    assert torch.equal(jpeg_round_trip(image, 40)[0], expected.float())
    assert torch.equal(get_defense("jpeg", quality=40)(image), jpeg_round_trip(image, 40))


def test_bit_depth_quantises_to_its_levels(batch):
    out = get_defense("bit_depth", bits=2)(batch[0])
    assert set(torch.unique(out * 3).round().tolist()) <= {0.0, 1.0, 2.0, 3.0}


def test_resize_pad_keeps_the_size_and_pads_with_zeros(batch):
    out = get_defense("resize_pad", min_scale=0.5, seed=1)(batch[0])
    assert out.shape == batch[0].shape and out.min() >= 0
    assert (out == 0).any()  # some margin of the canvas is padding


def test_input_defense_changes_what_the_encoder_sees_even_with_shared_tokens(tiny_adapter, batch):
    pixels, questions, _ = batch
    target = _target(tiny_adapter, "bit_depth", bits=1)
    shared = tiny_adapter.encode(pixels)
    assert torch.equal(target.candidate_logprobs(pixels, questions, ANSWERS, tokens=shared),
                       target.candidate_logprobs(pixels, questions, ANSWERS))
    assert not torch.equal(target.encode(pixels).features, shared.features)


# ---------------------------------------------------------------- score defenses
class _Negate(ScoreDefense):
    """Test fixture: reverses the importance ranking."""

    name = "negate"

    def transform(self, scores, tokens, layer, reduce):
        return -scores


@pytest.mark.parametrize("compressor", ["fastervlm", "visionzip", "vispruner"])
def test_score_defenses_reach_every_compressor_that_ranks_by_cls_attention(tiny_adapter, batch, compressor):
    pixels = batch[0]
    plain = Target(tiny_adapter, compressor, 16).forward(pixels).plan
    defended = Target(tiny_adapter, compressor, 16, defenses=[_Negate()]).forward(pixels).plan
    assert not torch.equal(plain.weights, defended.weights)


def test_a_compressor_that_bypasses_cls_attention_is_refused_not_silently_undefended(tiny_adapter, batch):
    target = Target(tiny_adapter, "prumerge", 16, defenses=[_Negate()])
    with pytest.raises(UserInputError, match="did not read the CLS attention"):
        target.forward(batch[0])


def test_score_smoothing_is_a_box_filter_over_the_grid():
    tokens = type("T", (), {"grid": (3, 3)})()
    scores = torch.zeros(1, 9)
    scores[0, 0] = 9.0
    out = get_defense("score_smoothing", kernel=3).transform(scores, tokens, None, "mean").view(3, 3)
    # the corner's 2x2 neighbourhood averages over 4 tokens, the edges' over 6, the centre over 9
    assert out[0, 0] == pytest.approx(9 / 4) and out[0, 1] == pytest.approx(9 / 6)
    assert out[1, 1] == pytest.approx(1.0) and out[2, 2] == 0


def test_score_noise_scales_with_the_score_spread():
    scores = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    small, large = get_defense("score_noise", sigma=0.1, seed=0), get_defense("score_noise", sigma=0.1, seed=0)
    d_small = small.transform(scores, None, None, "mean") - scores
    d_large = large.transform(scores * 100, None, None, "mean") - scores * 100
    assert torch.allclose(d_large, d_small * 100)


# ---------------------------------------------------------------- translation consensus
def test_shift_pixels_moves_content_and_replicates_edges():
    image = torch.arange(16.0).view(1, 1, 4, 4)
    down = shift_pixels(image, 1, 0)[0, 0]
    assert torch.equal(down[1:], image[0, 0, :3]) and torch.equal(down[0], image[0, 0, 0])
    left = shift_pixels(image, 0, -2)[0, 0]
    assert torch.equal(left[:, :2], image[0, 0, :, 2:]) and torch.equal(left[:, 3], image[0, 0, :, 3])


def test_align_scores_by_hand():
    s = torch.arange(9.0).view(1, 9)  # grid rows [0 1 2], [3 4 5], [6 7 8]
    # a view whose content moved one token down: unshifted row i sits at view row i + 1 (edge replicated)
    assert align_scores(s, (3, 3), 1, 0).view(3, 3).tolist() == [[3, 4, 5], [6, 7, 8], [6, 7, 8]]
    # half a token right: the mean of each token and its right neighbour
    assert align_scores(s, (3, 3), 0, 0.5).view(3, 3)[0].tolist() == [0.5, 1.5, 2.0]


def test_translation_consensus_combines_shifted_views_before_top_k(tiny_adapter, batch):
    pixels = batch[0]
    defense = get_defense("translation_consensus", shift=4, views=2)  # half a patch (8 px) on the tiny model
    target = Target(tiny_adapter, "fastervlm", 16, defenses=[defense])
    base = tiny_adapter.encode(pixels).cls_attention()
    # by hand: views shifted by (+4, +4) and (-4, -4) px = (+0.5, +0.5) and (-0.5, -0.5) tokens
    views = [tiny_adapter.encode(shift_pixels(pixels, d, d)).cls_attention() for d in (4, -4)]
    aligned = [align_scores(v, (12, 12), o, o) for v, o in zip(views, (0.5, -0.5))]
    consensus = torch.stack([base, *aligned]).mean(dim=0)
    kept = target.forward(pixels).plan.primary_sources()
    assert torch.equal(kept, topk_sorted(consensus, 16))
    assert torch.allclose(target.encode(pixels).cls_attention(), consensus, atol=1e-6)


# ---------------------------------------------------------------- selection defenses
def test_random_budget_stays_within_its_declared_range(tiny_adapter, batch):
    pixels = batch[0].repeat(4, 1, 1, 1)
    defense = get_defense("random_budget", low=0.5, high=1.5, seed=0)
    target = Target(tiny_adapter, "fastervlm", 16, defenses=[defense])
    assert defense.budget_range(16, 144) == (8, 24) and defense.budget_range(120, 144) == (60, 144)
    seen = set()
    for _ in range(5):
        plan = target.forward(pixels).plan
        counts = plan.lengths.tolist() if plan.lengths is not None else [plan.budget] * 8
        rows = (plan.weights.abs().sum(-1) > 0).sum(-1).tolist()
        assert rows == counts and all(8 <= k <= 24 for k in counts)
        seen.update(counts)
    assert len(seen) > 3


def test_ensemble_votes_by_hand():
    # 5 patches; each plan keeps 2 tokens, the last row of the second plan is the CLS (index 5)
    deployed = KeepPlan.from_indices(torch.tensor([[0, 1]]), 5)
    other = KeepPlan.from_indices(torch.tensor([[1, 5]]), 5)
    assert primary_votes(deployed).tolist() == [[1, 1, 0, 0, 0]]
    assert primary_votes(other).tolist() == [[0, 1, 0, 0, 0]]


def test_ensemble_keeps_the_tokens_with_most_votes(tiny_adapter, batch):
    pixels = batch[0]
    target = Target(tiny_adapter, "visionzip", 16, defenses=[{"ensemble": {"members": ["fastervlm", "divprune"]}}])
    plan = target.forward(pixels).plan
    assert plan.budget == 16 and torch.equal(plan.weights.max(-1).values, torch.ones(2, 16))  # pure selection
    votes = sum(primary_votes(Target(tiny_adapter, c, 16).forward(pixels).plan)
                for c in ("visionzip", "fastervlm", "divprune"))
    kept = plan.kept_patch_mask()
    for b in range(2):
        assert votes[b][kept[b]].min() >= votes[b][~kept[b]].max()


# ---------------------------------------------------------------- detection
def test_detection_rates_by_hand():
    rates = detection_rates([False, False, True, False], [True, True, False])
    assert rates.fpr == pytest.approx(0.25) and rates.tpr == pytest.approx(2 / 3)
    assert (rates.clean, rates.adversarial) == (4, 3)
    with pytest.raises(UserInputError):
        detection_rates([], [True])


class _Fixed(DetectionDefense):
    """Test fixture: the statistic is the mean pixel value."""

    name = "fixed"
    fpr = 0.25

    def statistic(self, target, pixels):
        return pixels.flatten(1).mean(-1)


def test_calibration_meets_the_target_false_positive_rate():
    clean = torch.linspace(0, 1, 8).view(8, 1, 1, 1).expand(8, 3, 2, 2)
    detector = _Fixed()
    with pytest.raises(UserInputError, match="calibrate"):
        detector.flags(None, clean)
    threshold = detector.calibrate(None, clean)
    assert threshold == pytest.approx(6 / 7)  # the 75 % quantile, rounded up to an observed value
    assert detector.flags(None, clean).float().mean() <= 0.25
    adv = torch.full((4, 3, 2, 2), 0.95)
    rates = detector.rates(None, clean, adv)
    assert rates.tpr == 1.0 and rates.fpr == pytest.approx(1 / 8)


def test_ranking_instability_is_a_bounded_deterministic_statistic(tiny_adapter, batch):
    target = Target(tiny_adapter, "fastervlm", 16, defenses=["ranking_instability"])
    detector = target.defenses[0]
    stat = detector.statistic(target, batch[0])
    assert stat.shape == (2,) and ((stat >= 0) & (stat <= 1)).all()
    assert torch.equal(stat, detector.statistic(target, batch[0]))
    everything = get_defense("ranking_instability", top=144)  # the top-144 of 144 tokens never changes
    assert everything.statistic(target, batch[0]).tolist() == [0.0, 0.0]


# ---------------------------------------------------------------- gradient masking is caught
class _ZeroGradient(InputDefense):
    """Test fixture, not a defense: the identity with its gradient zeroed, declared differentiable (a lie)."""

    name = "zero_gradient"

    def __call__(self, pixels):
        return pixels.detach() + 0 * pixels


@pytest.mark.parametrize("attack, options", [("cage", {}), ("whitebox", {"relaxation": "auto"})])
def test_adaptive_attacks_go_through_the_targets_defenses(tiny_adapter, batch, attack, options):
    pixels, questions, answers = batch
    masked = Target(tiny_adapter, "fastervlm", 16, defenses=[_ZeroGradient()])
    attack = get_attack(attack, masked, eps=8 / 255, steps=2, random_start=False, **options)
    adv = attack(pixels, questions, answers).adv
    assert torch.equal(adv, pixels)  # every gradient through the defense is zero: the attack cannot move


def _records(target: Target, adv: torch.Tensor, labels, questions, defense: str, adaptive: bool, eps: float,
             clean: list[bool]) -> list[dict]:
    preds = target.predict(adv, questions, ANSWERS)
    return [{"sample": i, "attack": "whitebox", "attack_threat": "whole-model", "eps": eps, "steps": 3,
             "compressor": "fastervlm", "budget": 16, "defense": defense, "adaptive": adaptive,
             "correct": p == y, "clean_correct": c, "full_token_correct": c, "seconds": 0.1}
            for i, (p, y, c) in enumerate(zip(preds, labels, clean))]


@pytest.fixture(scope="module")
def masked_records(tiny_adapter, samples):
    """Records of PGD (3 steps) at a small and a huge ε on the plain and the gradient-masking target;
    labels are the plain target's clean predictions, so clean accuracy is 100 %."""
    chunk = samples[:6]
    pixels, questions = to_pixels(chunk), [s.question for s in chunk]
    plain = Target(tiny_adapter, "fastervlm", 16)
    masked = Target(tiny_adapter, "fastervlm", 16, defenses=[_ZeroGradient()])
    labels = plain.predict(pixels, questions, ANSWERS)
    rows = []
    for eps in (2 / 255, 0.5):
        def craft(target):
            attack = get_attack("whitebox", target, eps=eps, steps=3, random_start=False, relaxation=None,
                                **adaptive_attack_options(target))
            return attack(pixels, questions, labels).adv
        on_plain = craft(plain)
        clean_masked = [p == y for p, y in zip(masked.predict(pixels, questions, ANSWERS), labels)]
        rows += _records(plain, on_plain, labels, questions, "none", False, eps, [True] * 6)
        rows += _records(masked, on_plain, labels, questions, "zero_gradient", False, eps, clean_masked)
        rows += _records(masked, craft(masked), labels, questions, "zero_gradient", True, eps, clean_masked)
    return pd.DataFrame(rows)


def test_sanity_checks_catch_a_gradient_masking_defense(masked_records):
    checks = sanity_checks(masked_records)
    violated = {(c.check, c.scope["defense"], c.scope["adaptive"]) for c in checks if c.violated}
    assert ("large_eps", "zero_gradient", True) in violated
    assert ("transfer_not_stronger", "zero_gradient", True) in violated
    assert not any(d == "none" for _, d, _ in violated)  # the honest evaluation passes
    assert unreliable(masked_records)
    assert not unreliable(masked_records[masked_records["defense"] == "none"])


def _sections(records) -> dict[str, str]:
    """Each report section as the Markdown summary renders it, by title."""
    from robustvtc.campaign.formatting import render

    return {s.title: render("summary.md.j2", title="t", head="h", sections=[s]) for s in report_sections(records)}


def test_report_sections_mark_the_masked_rows_unreliable(masked_records):
    sections = _sections(masked_records)
    assert list(sections) == ["Defenses: clean accuracy", "Defenses: robust accuracy, non-adaptive vs adaptive",
                              "Sanity checks against gradient masking", "Defenses: cost"]
    robust = sections["Defenses: robust accuracy, non-adaptive vs adaptive"].splitlines()
    assert all(("unreliable" in line) == ("zero_gradient" in line) for line in robust if "fastervlm@16" in line)
    assert "**Unreliable: gradient masking is likely" in sections["Sanity checks against gradient masking"]


def test_undefended_report_says_which_checks_ran(masked_records):
    from robustvtc.campaign.masking import violations

    plain = masked_records[masked_records["defense"] == "none"]
    sections = _sections(plain)
    assert list(sections) == ["Sanity checks against gradient masking"]  # no empty defense sections
    text = sections["Sanity checks against gradient masking"]
    assert "No sign of gradient masking" not in text and "**No violation among the checks that ran;" in text
    assert "`transfer_not_stronger` not run (no defenses)" in text and "`large_eps`: ran on all 1 rows" in text
    small = pd.DataFrame(_curve({2 / 255: 0.6, 8 / 255: 0.3}))
    text = _sections(small)["Sanity checks against gradient masking"]
    assert "`large_eps` not applicable on 1 of 1 rows (no ε ≥ 64/255)" in text
    assert violations(plain) == []
    found = violations(masked_records)
    assert found and {v.split(":")[0] for v in found} <= {"large_eps", "transfer_not_stronger", "monotone_in_eps"}


def _curve(accuracies: dict[float, float], n: int = 40, clean: float = 1.0, **fixed) -> list[dict]:
    rows = []
    for eps, acc in accuracies.items():
        hits = round(acc * n)
        rows += [{"sample": i, "attack": "pgd", "eps": eps, "compressor": "fastervlm", "budget": 16, "defense": "none",
                  "adaptive": False, "correct": i < hits, "clean_correct": i < round(clean * n), "seconds": 1.0,
                  **fixed} for i in range(n)]
    return rows


def test_monotone_check_flags_significant_rises_only():
    rising = pd.DataFrame(_curve({2 / 255: 0.2, 8 / 255: 0.6}))
    noisy = pd.DataFrame(_curve({2 / 255: 0.2, 8 / 255: 0.25}))
    [rise] = [c for c in sanity_checks(rising) if c.check == "monotone_in_eps"]
    assert rise.violated and rise.figures["accuracy_high"] == pytest.approx(0.6)
    assert not any(c.violated for c in sanity_checks(noisy))
    above_clean = pd.DataFrame(_curve({2 / 255: 0.9}, clean=0.3))  # the clean accuracy is the ε = 0 point
    assert [c.check for c in sanity_checks(above_clean) if c.violated] == ["monotone_in_eps"]


def test_large_eps_check_is_not_applicable_without_a_large_radius():
    checks = sanity_checks(pd.DataFrame(_curve({2 / 255: 0.5})))
    [large] = [c for c in checks if c.check == "large_eps"]
    assert large.status == "not applicable"
    strict = Thresholds(large_eps=2 / 255)
    assert [c.status for c in sanity_checks(pd.DataFrame(_curve({2 / 255: 0.5})), strict)
            if c.check == "large_eps"] == ["violated"]


def test_detection_section_reports_rates_from_records():
    rows = [{"sample": i, "attack": "clean", "eps": 0.0, "flagged": f, "adaptive": False}
            for i, f in enumerate([False, False, True, False])]
    rows += [{"sample": i, "attack": "cage", "eps": 8 / 255, "flagged": f, "adaptive": True}
             for i, f in enumerate([True, True, False])]
    base = {"compressor": "fastervlm", "budget": 16, "correct": 0.0, "clean_correct": 1.0, "seconds": 1.0}
    records = pd.DataFrame([{**base, **r, "defense": d} for d in ("ranking_instability(top=16)", "none")
                            for r in rows])
    sections = _sections(records)
    [line] = [x for x in sections["Defenses: detection"].splitlines() if x.startswith("| ranking_instability")]
    assert line.split(" | ")[-2:] == ["66.7", "25.0 |"]
    assert "| none" not in sections["Defenses: detection"]
