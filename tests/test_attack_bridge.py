"""torchattacks through the bridge: PGD runs unchanged, and the APGD / batch-subset traps are guarded."""
from __future__ import annotations

import pytest
import torch

torchattacks = pytest.importorskip("torchattacks")

from robustvtc.attacks import CandidateLogits, run_torchattack  # noqa: E402
from robustvtc.data.synthetic import ANSWERS, to_pixels  # noqa: E402
from robustvtc.errors import UserInputError  # noqa: E402
from robustvtc.target import Target  # noqa: E402


@pytest.fixture(scope="module")
def setup(tiny_adapter, samples):
    chunk = samples[:3]
    clean = to_pixels(chunk)
    bridge = CandidateLogits(Target(tiny_adapter, "fastervlm", 16), clean, [s.question for s in chunk], ANSWERS)
    return bridge, clean, bridge.labels([s.answer for s in chunk])


def test_pgd_runs_unchanged_and_raises_the_loss(setup):
    bridge, clean, labels = setup
    adv = torchattacks.PGD(bridge, eps=8 / 255, alpha=2 / 255, steps=3, random_start=False)(clean, labels)
    assert (adv - clean).abs().max() <= 8 / 255 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy
        assert ce(bridge(adv), labels) > ce(bridge(clean), labels)
    assert bridge(clean).shape == (3, len(ANSWERS))


def test_apgd_trap_clean_images_come_back_and_run_torchattack_avoids_it(setup):
    bridge, clean, labels = setup
    eps = 1e-3  # too small to flip most answers
    raw = torchattacks.APGD(bridge, eps=eps, steps=3)(clean, labels)
    with torch.no_grad():
        unflipped = bridge(raw).argmax(-1) == bridge(clean).argmax(-1)
    assert unflipped.any()
    assert torch.equal(raw[unflipped], clean[unflipped])  # the trap: no perturbation at all for them
    guarded = run_torchattack(torchattacks.APGD(bridge, eps=eps, steps=3), clean, labels)
    moved = (guarded - clean).flatten(1).abs().amax(dim=1)
    assert bool((moved > 0).all()) and bool((moved <= eps + 1e-6).all())


def test_subset_calls_are_matched_to_their_questions(setup):
    bridge, clean, _ = setup
    subset = (clean[[2, 0]] + 4 / 255 * torch.randn_like(clean[[2, 0]]).sign()).clamp(0, 1)
    assert bridge.questions_for(subset) == [bridge.questions[2], bridge.questions[0]]
    with torch.no_grad():  # a subset gives the same logits as the full batch's rows
        assert torch.allclose(bridge(clean[[2, 0]]), bridge(clean)[[2, 0]], atol=1e-5)


def test_ambiguous_subset_call_raises_a_clear_error(tiny_adapter, samples):
    image = to_pixels(samples[:1])
    clean = torch.cat([image, image])  # one image, two questions: a subset call cannot be attributed
    bridge = CandidateLogits(Target(tiny_adapter), clean, ["is there a red circle ?", "what color is the circle ?"],
                             ANSWERS)
    with pytest.raises(UserInputError, match="cannot be matched"):
        bridge(clean[:1])
    assert bridge(clean).shape == (2, len(ANSWERS))  # full batches are positional


def test_multiattack_works_on_subsets(setup):
    bridge, clean, labels = setup
    atk = torchattacks.MultiAttack([torchattacks.PGD(bridge, eps=8 / 255, alpha=2 / 255, steps=1),
                                    torchattacks.PGD(bridge, eps=8 / 255, alpha=2 / 255, steps=1, random_start=True)])
    adv = atk(clean, labels)
    assert adv.shape == clean.shape and (adv - clean).abs().max() <= 8 / 255 + 1e-6


def test_unknown_answer_label_is_a_user_error(setup):
    bridge, *_ = setup
    with pytest.raises(UserInputError, match="not among the candidates"):
        bridge.labels(["banana"])


def test_warns_for_attacks_that_return_clean_images(setup):
    bridge, clean, labels = setup
    with pytest.warns(UserWarning, match="clean image"):
        pgd = [torchattacks.PGD(bridge, eps=1e-3, steps=1) for _ in range(2)]
        run_torchattack(torchattacks.MultiAttack(pgd), clean, labels)
