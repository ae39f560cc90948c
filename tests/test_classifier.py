"""ViT classifiers with token reduction inside the encoder, on the real DeiT-tiny weights (offline, few images)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from robustvtc.classifier import ViTClassifier, attack_table, paired_gaps
from robustvtc.compression.tome import merge_schedule
from robustvtc.errors import UserInputError

DEIT = Path(__file__).resolve().parents[2] / "shared/models/deit-tiny-patch16-224"
pytestmark = pytest.mark.skipif(not (DEIT / "model.safetensors").is_file(), reason="DeiT-tiny weights not present")


@pytest.fixture(scope="module")
def clf():
    return ViTClassifier.from_pretrained(str(DEIT))


@pytest.fixture(scope="module")
def pixels():
    from robustvtc.data.synthetic import generate_dataset, to_pixels

    px = to_pixels(generate_dataset(3, "test"))
    return torch.nn.functional.interpolate(px, size=224, mode="bilinear", align_corners=False).clamp(0, 1)


def test_full_tokens_are_the_checkpoints_own_forward(clf, pixels):
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        own = clf.model(pixel_values=(pixels - mean) / std).logits
        assert torch.allclose(clf.logits(pixels), own, atol=1e-5)
        # the hand-run blocks (ToMe's path with nothing to merge) give the same logits
        assert torch.allclose(clf.logits(pixels, "tome", 196), own, atol=1e-4)
    assert clf.num_visual_tokens == 196 and clf.grid == (14, 14) and len(clf.labels) == 1000


def test_reductions_keep_their_budget(clf, pixels):
    assert ViTClassifier.keep_counts(16, 3, 196) == [85, 37, 16]
    for k in (8, 16, 64):
        assert 196 - sum(merge_schedule(196, k, 12)) == k
    with pytest.raises(UserInputError, match="tome cannot reach budget 0"):
        merge_schedule(196, 0, 12)
    state = {}
    reduce = ViTClassifier._reduce

    def spy(x, cls_attn, keep, method, fuse, gen):
        out = reduce(x, cls_attn, keep, method, fuse, gen)
        state.setdefault(method, []).append(out.shape[1])
        return out

    ViTClassifier._reduce = staticmethod(spy)
    try:
        with torch.no_grad():
            clf.logits(pixels, "evit", 16)
            clf.logits(pixels, "random", 16)
            clf.logits(pixels, "evit", 16, fuse=False)
    finally:
        ViTClassifier._reduce = staticmethod(reduce)
    assert state["evit"] == [1 + 85 + 1, 1 + 37 + 1, 1 + 16 + 1, 1 + 85, 1 + 37, 1 + 16]
    assert state["random"] == [1 + 85, 1 + 37, 1 + 16]


def test_evit_fuses_the_inattentive_tokens_by_cls_attention():
    x = torch.arange(2 * 5 * 3, dtype=torch.float).view(2, 5, 3)
    cls_attn = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.5, 0.1, 0.3, 0.1]])
    out = ViTClassifier._reduce(x, cls_attn, 2, "evit", True, torch.Generator())
    assert torch.equal(out[0, 1:3], x[0, [2, 4]]) and torch.equal(out[1, 1:3], x[1, [1, 3]])
    assert torch.allclose(out[0, 3], 0.1 * x[0, 1] + 0.2 * x[0, 3])
    assert torch.allclose(out[1, 3], 0.1 * x[1, 2] + 0.1 * x[1, 4])


def test_attacks_run_on_the_classifier(clf, pixels):
    rows = attack_table(clf, pixels[:2], attacks=["fulltoken", "cage"], methods=["evit", "tome"], budgets=[16],
                        steps=2, labels=[0, 1], batch_size=2)
    cells = {(r["attack"], r["method"], r["budget"]) for r in rows}
    assert cells == {(a, m, k) for a in ("clean", "fulltoken", "cage") for m, k in
                     (("none", 196), ("evit", 16), ("tome", 16))}
    clean_full = next(r for r in rows if r["attack"] == "clean" and r["method"] == "none")
    assert clean_full["agreement"] == 1.0 and 0 <= clean_full["accuracy"] <= 1
    assert all(0 <= r["agreement_ci"][0] <= r["agreement"] <= r["agreement_ci"][1] <= 1 for r in rows)
    gaps = paired_gaps(rows)
    assert {(g["method"], g["budget"]) for g in gaps} == {("none", 196), ("evit", 16), ("tome", 16)}


def test_bad_arguments_fail_in_one_line(clf, pixels, tmp_path):
    for call, needle in [(lambda: clf.logits(pixels, "evti", 16), "unknown token reduction 'evti'; accepted: none"),
                         (lambda: clf.logits(pixels, "evit", 0), "budget 0 out of range; accepted: 1..196"),
                         (lambda: ViTClassifier.from_pretrained(str(tmp_path)), "cannot load a ViT classifier")]:
        with pytest.raises(UserInputError, match=needle) as err:
            call()
        assert "\n" not in str(err.value)
