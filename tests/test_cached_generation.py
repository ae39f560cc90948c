"""Cached greedy generation (prefill once, decode against the KV cache) gives the tokens of the uncached path."""
from __future__ import annotations

import pytest

from robustvtc.target import Target
from test_real_adapters import QUESTIONS, TINY_KWARGS, adapters, pixels_for, saved  # noqa: F401  (fixtures)

CASES = [("none", None, {}), ("random", 8, {"seed": 1}), ("fastervlm", 8, {}), ("pooling", 4, {})]


class Replay:
    """An in-LLM hook that replays the keep decisions of an earlier run (prune-once on the uncached path)."""

    def __init__(self, hook):
        self.layers, self.position_policy = hook.layers, hook.position_policy
        self.decisions = dict(hook.decisions)

    def select(self, ctx):
        return self.decisions[ctx.layer], None


class Recording:
    """Wraps a bound in-LLM hook and records what it kept at each pruning layer."""

    def __init__(self, hook):
        self.hook, self.layers, self.position_policy = hook, hook.layers, hook.position_policy
        self.decisions = {}

    def select(self, ctx):
        keep, gain = self.hook.select(ctx)
        self.decisions[ctx.layer] = keep
        return keep, gain


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("name,budget,kwargs", CASES)
def test_cached_tokens_equal_the_uncached_ones(adapters, family, name, budget, kwargs):
    a = adapters[family]
    if name == "fastervlm" and not {"cls_token"} <= a.capabilities:
        name, budget, kwargs = "divprune", 8, {}
    if family == "llava_next" and budget is not None:
        budget = 10
    fwd = Target(a, name, budget, **kwargs).forward(pixels_for(a))
    cached = a.generate_ids(fwd.embeds, QUESTIONS, 6, cache=True)
    assert cached == a.generate_ids(fwd.embeds, QUESTIONS, 6, cache=False)
    assert all(len(c) > 0 for c in cached)


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
@pytest.mark.parametrize("name", ["fastv", "pdrop", "sparsevlm"])
def test_in_llm_cache_prunes_once(adapters, family, name):
    """With an in-LLM method the prefill prunes and new tokens attend to the pruned cache: the same tokens as the
    uncached path that replays the prefill's decisions; the first token is the re-pruning path's too."""
    a = adapters[family]
    fwd = Target(a, name, 8 if family != "llava_next" else 10, **TINY_KWARGS[name]).forward(pixels_for(a))
    recording = Recording(fwd.in_llm)
    cached = a.generate_ids(fwd.embeds, QUESTIONS, 6, in_llm=recording, cache=True)
    replayed = a.generate_ids(fwd.embeds, QUESTIONS, 6, in_llm=Replay(recording), cache=False)
    assert cached == replayed
    reprune = a.generate_ids(fwd.embeds, QUESTIONS, 1, in_llm=fwd.in_llm, cache=False)
    assert [c[:1] for c in cached] == reprune


def test_generate_text_and_cache_flag(adapters):
    a = adapters["llava"]
    fwd = Target(a, "none").forward(pixels_for(a))
    assert a.generate(fwd.embeds, QUESTIONS, 4) == a.generate(fwd.embeds, QUESTIONS, 4, cache=False)
    assert a.generate_ids(fwd.embeds, QUESTIONS, 0) == [[], []]
