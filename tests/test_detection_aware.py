"""Detection-aware attacks: against a detection defense the loop evades the detector and the task at once."""
import pytest
import torch

from robustvtc.attacks import get_attack
from robustvtc.data.synthetic import to_pixels
from robustvtc.defenses import get_defense
from robustvtc.errors import UserInputError
from robustvtc.target import Target


def _target(adapter, threshold):
    return Target(adapter, "fastervlm", 16, defenses=[get_defense("ranking_instability", threshold=threshold)])


def test_a_detector_that_never_flags_changes_nothing(tiny_adapter, samples):
    clean = to_pixels(samples[:2])
    target = _target(tiny_adapter, 1.0)
    auto = get_attack("fulltoken", target, steps=2)(clean)
    off = get_attack("fulltoken", target, steps=2, evade_detection=False)(clean)
    assert torch.equal(auto.adv, off.adv)


def test_flagged_samples_descend_the_detector(tiny_adapter, samples):
    clean = to_pixels(samples[:2])
    target = _target(tiny_adapter, 0.0)  # flags everything: every step descends the detector's surrogate
    detector = target.defenses[0]
    attack = get_attack("fulltoken", target, eps="8/255", steps=4, random_start=False)
    start = detector.surrogate(target, clean)
    result = attack(clean)
    with torch.no_grad():
        assert (detector.surrogate(target, result.adv) <= start + 1e-6).all()
    with pytest.raises(UserInputError, match="evade_detection=true needs"):
        get_attack("fulltoken", Target(tiny_adapter, "fastervlm", 16), evade_detection=True)(clean)


def test_surrogate_has_a_gradient(tiny_adapter, samples):
    clean = to_pixels(samples[:1]).requires_grad_(True)
    target = _target(tiny_adapter, 0.5)
    target.defenses[0].surrogate(target, clean).sum().backward()
    assert clean.grad is not None and clean.grad.abs().sum() > 0
