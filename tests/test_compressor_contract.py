"""The contract every registered compressor keeps (garak-style plugin tests), on the tiny built-in architecture.

Keep-plan rows sum to 1 wherever the method averages; the documented exceptions (``normalized_plan =
False``) are the methods that add: VisionZip's reference ``target + mean(members)`` and PruMerge's
``x_i + sum_j a_j x_j`` -- for those each row still contains its own token with weight exactly 1.
"""
from __future__ import annotations

import pytest
import torch

from robustvtc.compression import COMPRESSORS, list_compressors
from robustvtc.data.synthetic import generate_sample, to_pixels
from robustvtc.errors import UserInputError
from robustvtc.target import Target

N = 144
BUDGET = 36
# the tiny LLM has 3 decoder layers; SparseVLM's paper layer 2 would prune before a layer 3 it lacks.
# The tiny encoder has 4 layers: VScan's shallow layer 5 and HiPrune's object layer 9 (of CLIP-L's 24) do not exist
TINY_KWARGS = {"sparsevlm": {"layer": 2}, "vscan": {"shallow_layer": 1}, "hiprune": {"object_layer": 2}}
CANDIDATES = ["yes", "no", "red"]
NAMES = list_compressors()
# what the tiny LLaVA runs: every method but those needing a signal only CLS-free towers give (visionzip_qwen,
# tested on tiny Qwen2-VL / Qwen2.5-VL in test_real_adapters.py and test_visionzip_qwen.py)
RUNS = [n for n in NAMES if "received_attention" not in COMPRESSORS.get(n).requires]


def budget_for(name: str) -> int:
    return N if name == "none" else BUDGET


def target_for(adapter, name: str, budget: int | None = None) -> Target:
    return Target(adapter, name, budget_for(name) if budget is None else budget, **TINY_KWARGS.get(name, {}))


@pytest.fixture(scope="module")
def batch():
    # questions of different lengths, so batching left-pads one of them
    samples = [generate_sample(i) for i in (0, 4)]
    assert len({len(s.question.split()) for s in samples}) == 2
    return to_pixels(samples), [s.question for s in samples]


def run(target: Target, pixels: torch.Tensor, questions: list[str]):
    """(forward, candidate log-probs, tokens reaching the LLM per sample)."""
    fwd = target.forward(pixels)
    logp = target.adapter.candidate_logprobs(fwd.embeds, questions, CANDIDATES, in_llm=fwd.in_llm)
    kept = fwd.in_llm.last_keep.shape[1] if fwd.in_llm is not None else fwd.embeds.shape[1]
    return fwd, logp, kept


def test_every_method_is_registered():
    assert set(NAMES) >= {"none", "random", "fastervlm", "visionzip", "vispruner", "prumerge", "prumerge_plus",
                          "tome", "divprune", "pooling", "fastv", "sparsevlm", "dart", "pdrop"}


@pytest.mark.parametrize("name", NAMES)
def test_metadata(name):
    cls = COMPRESSORS.get(name)
    assert cls.name == name and cls.paper and cls.native_knob
    assert cls.stage in ("pre_llm", "in_encoder", "in_llm")
    assert all(isinstance(getattr(cls, a), bool) for a in ("text_aware", "randomized", "relaxable"))
    comp = cls(**TINY_KWARGS.get(name, {}))
    assert repr(comp).startswith(type(comp).__name__)
    mapping = comp.budget_mapping(budget_for(name), N)
    assert mapping["budget"] == budget_for(name)
    if cls.relaxable:
        assert cls(relaxation="straight_through", **TINY_KWARGS.get(name, {})).relaxation == "straight_through"
    else:
        with pytest.raises(TypeError):
            cls(relaxation="straight_through")


@pytest.mark.parametrize("name", RUNS)
def test_exact_budget_valid_plan_and_gradient(tiny_adapter, batch, name):
    pixels, questions = batch
    pixels = pixels.clone().requires_grad_()
    target = target_for(tiny_adapter, name)
    fwd, logp, kept = run(target, pixels, questions)
    assert kept == budget_for(name)
    assert torch.isfinite(logp).all()
    if fwd.in_llm is not None:
        keep = fwd.in_llm.last_keep
        assert keep.shape == (2, BUDGET) and (keep.diff(dim=1) > 0).all() and 0 <= keep.min() and keep.max() < N
        _, mask = tiny_adapter.hidden_states(fwd.embeds, questions, in_llm=fwd.in_llm)
        full, _ = tiny_adapter.hidden_states(fwd.embeds, questions)
        assert mask.shape[1] == full.shape[1] - (N - BUDGET)  # the LLM really runs on fewer tokens
    else:
        w = fwd.plan.weights
        assert fwd.embeds.shape == (2, kept, tiny_adapter.model.config.text_config.hidden_size)
        assert w.shape == (2, kept, N + 1) and (w >= 0).all()
        if target.compressor.normalized_plan:
            assert torch.allclose(w.sum(-1), torch.ones(2, kept), atol=1e-5)
        else:
            assert (w.max(-1).values[:, :-1] >= 1 - 1e-6).all()  # each merged token holds its own source at 1
    logp[:, 0].sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0 and torch.isfinite(pixels.grad).all()


@pytest.mark.parametrize("name", RUNS)
def test_deterministic(tiny_adapter, batch, name):
    pixels, questions = batch
    with torch.no_grad():
        _, a, _ = run(target_for(tiny_adapter, name), pixels, questions)
        _, b, _ = run(target_for(tiny_adapter, name), pixels, questions)  # a fresh instance: same seed
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", [n for n in RUNS if not COMPRESSORS.get(n).randomized])
def test_batch_item_equals_the_item_alone(tiny_adapter, batch, name):
    pixels, questions = batch
    target = target_for(tiny_adapter, name)
    with torch.no_grad():
        fwd, logp, _ = run(target, pixels, questions)
        for b in range(2):
            one, logp_one, _ = run(target, pixels[b:b + 1], questions[b:b + 1])
            assert torch.allclose(logp[b], logp_one[0], atol=1e-4)
            if fwd.in_llm is not None:
                assert torch.equal(fwd.in_llm.last_keep[b], one.in_llm.last_keep[0])
            else:
                assert torch.equal(fwd.plan.primary_sources()[b], one.plan.primary_sources()[0])
                assert torch.allclose(fwd.embeds[b], one.embeds[0], atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("budget", [0, N + 1, 2.5])
def test_bad_budgets_raise(tiny_adapter, name, budget):
    with pytest.raises(UserInputError):
        target_for(tiny_adapter, name, budget)
