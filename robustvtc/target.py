"""A target is what is under test: an LVLM adapter + a compressor + a budget (+ defenses).

It exposes the whole pipeline as differentiable functions of the pixels, so attacks, defenses and the
campaign runner share one code path whatever the model family or compressor. Defenses act at their hook
points: input transforms before the encoder, score defenses on the CLS attention the compressor reads,
a selection defense around the compressor, output defenses on the answer scores, detectors in
:meth:`Target.detect`.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Iterator, Sequence

import torch

from .compression import Compressor, KeepPlan, check_compatible, get_compressor
from .compression.base import EncoderCompressor, InLLMCompressor
from .defenses.base import build_defenses
from .defenses.pipeline import DefendedCompressor, ScoredTokens
from .errors import UserInputError
from .models.base import VisualEmbeds, VisualTokens, split_budget


@dataclass
class Forward:
    """One pass of a target: the visual tokens, what the compressor kept, and the LLM-input embeddings."""

    tokens: VisualTokens
    embeds: torch.Tensor | list | VisualEmbeds  # (B, K, D_llm) after any pre-LLM compression, in the adapter's layout
    plan: KeepPlan | None  # None for in-LLM compressors (they decide inside the decoder)
    in_llm: object | None = None


class EncodingCache:
    """The visual tokens of one pixel batch (a campaign chunk's clean images), encoded once and read by every
    target that encodes exactly those pixels without input defenses -- the clean evaluation and each attack's
    clean reference -- for as long as the cache lives. An entry captured with more signal layers serves a
    request for fewer (the features do not depend on what is captured). Pixels that need a gradient, or any other
    pixels, are encoded as usual."""

    def __init__(self, pixels: torch.Tensor):
        self.pixels = pixels  # held, so its storage cannot be reused by other pixels while the cache lives
        self._entries: list[tuple[frozenset, VisualTokens]] = []

    def holds(self, pixels: torch.Tensor) -> bool:
        """Whether ``pixels`` are this cache's pixels (the same storage, view and version; no gradient)."""
        mine = self.pixels
        return (not pixels.requires_grad and pixels.data_ptr() == mine.data_ptr() and pixels.shape == mine.shape
                and pixels.stride() == mine.stride() and pixels.dtype == mine.dtype
                and pixels.device == mine.device and pixels._version == mine._version)

    def encode(self, adapter, pixels: torch.Tensor, layers: Sequence[int], validate: bool = True) -> VisualTokens:
        if not self.holds(pixels):
            return adapter.encode(pixels, layers, validate=validate)
        want = frozenset(layers)
        for have, tokens in self._entries:
            if have >= want:
                return tokens
        with torch.no_grad():
            tokens = adapter.encode(pixels, tuple(sorted(want)), validate=validate)
        self._entries.append((want, tokens))
        return tokens


class Target:
    """``defenses``: names, ``{name: options}`` mappings or Defense objects (see :mod:`robustvtc.defenses`).

    ``encodings``: an :class:`EncodingCache` shared with other targets of the same model (a campaign sets it)."""

    encodings: EncodingCache | None = None
    _recording: list | None = None

    def __init__(self, adapter, compressor: str | Compressor = "none", budget: int | None = None, defenses=(),
                 **compressor_kwargs):
        self.adapter = adapter
        self.compressor = get_compressor(compressor, **compressor_kwargs) if isinstance(compressor, str) else compressor
        n = adapter.num_visual_tokens
        self.budget = n if budget is None else self.compressor.check_budget(budget, n)
        if self.compressor.name == "none" and self.budget != n:
            raise UserInputError(f"compressor 'none' keeps all {n} tokens; got budget {budget}")
        check_compatible(adapter, self.compressor, self.budget)
        self.defenses = build_defenses(defenses)
        for defense in self.defenses:
            defense.check(self)
        # keeping every token selects nothing: score and selection defenses do not act on compressor "none"
        self._active = [d for d in self.defenses
                        if self.compressor.name != "none" or d.hook not in ("scores", "selection")]
        selection = self._hooked("selection")
        if len(selection) > 1:
            raise UserInputError(f"one selection defense per target, got {', '.join(d.name for d in selection)}")
        self._compress_with = self.compressor
        if selection or self._hooked("scores"):
            self._compress_with = DefendedCompressor(self.compressor, selection[0] if selection else None)

    def __repr__(self) -> str:
        shown = f", defenses={list(self.defenses)}" if self.defenses else ""
        return f"Target({self.adapter.name}, {self.compressor.name}, budget={self.budget}{shown})"

    def _hooked(self, hook: str) -> list:
        return [d for d in self._active if d.hook == hook]

    @property
    def randomized(self) -> bool:
        """Whether a forward pass draws randomness (compressor or any defense): attacks then need EOT."""
        return bool(self.compressor.randomized or any(d.randomized for d in self._active))

    @property
    def differentiable(self) -> bool:
        """Whether every defense's gradient is exact (False: some backward pass is a BPDA surrogate).

        The compressor's discrete selection is not counted: attacks handle it with its relaxations."""
        return all(d.differentiable for d in self._active)

    @property
    def signal_layers(self) -> tuple[int, ...]:
        return self.compressor.signal_layers()

    def encode(self, pixels: torch.Tensor, extra_layers: Sequence[int] = (), validate: bool = True) -> VisualTokens:
        """The visual tokens as this target's compressor reads them (input and score defenses applied);
        ``extra_layers``: encoder layers to capture signals of besides the compressor's."""
        return self._encode(pixels, extra_layers, validate)[1]

    def _encode(self, pixels, extra_layers: Sequence[int] = (), validate: bool = True):
        """(the pixels the encoder saw, their tokens)."""
        inputs = self._hooked("input")
        if inputs and validate:
            pixels = self.adapter.check_pixels(pixels)
        for defense in inputs:
            pixels = defense(pixels)
        layers = tuple(sorted({*self.signal_layers, *extra_layers})) if extra_layers else self.signal_layers
        if self.encodings is not None and not inputs:
            tokens = self.encodings.encode(self.adapter, pixels, layers, validate)
        else:
            tokens = self.adapter.encode(pixels, layers, validate=validate)
        return pixels, self._scored(tokens, pixels, layers)

    def _scored(self, tokens: VisualTokens, pixels, layers: Sequence[int]) -> VisualTokens:
        scores = self._hooked("scores")
        if not scores or isinstance(tokens, ScoredTokens):
            return tokens
        return ScoredTokens.wrap(tokens, [d.bind(self, pixels, layers) for d in scores])

    def forward(self, pixels: torch.Tensor | None = None, tokens: VisualTokens | None = None) -> Forward:
        """Encode (or reuse ``tokens``) and apply the compressor; the LLM part runs in the scoring methods.

        Shared ``tokens`` are the encoding of ``pixels`` as given: a target with input defenses encodes
        its transformed pixels itself."""
        if tokens is None or self._hooked("input"):
            pixels, tokens = self._encode(pixels)
        else:
            tokens = self._scored(tokens, pixels, self.signal_layers)
        if isinstance(self.compressor, InLLMCompressor):
            hook = self.compressor.bind(self.budget, tokens.num_tokens, getattr(self.adapter, "num_llm_layers", None))
            embeds = self._aux(self.adapter.project(tokens.features), tokens, None)
            fwd = Forward(tokens, self._with_lead(embeds, tokens), None, hook)
        else:
            if isinstance(self.compressor, EncoderCompressor) and pixels is None:  # merges inside the encoder
                raise UserInputError(f"{self.compressor.name} merges inside the vision encoder; pass the pixels")
            embeds, plan = self._compress(tokens, pixels)
            fwd = Forward(tokens, self._with_lead(self._aux(embeds, tokens, plan), tokens), plan)
        if self._recording is not None:
            self._recording.append(fwd)
        return fwd

    @contextmanager
    def recording(self) -> Iterator[list[Forward]]:
        """The :class:`Forward` passes this target makes inside the block, in order: what scored an input, and
        what its compressor kept doing so, without running the compressor again."""
        made: list[Forward] = []
        self._recording = made
        try:
            yield made
        finally:
            self._recording = None

    @property
    def scores_own_pixels(self) -> bool:
        """Whether an output defense scores pixels of its own (noisy copies) instead of the input's forward."""
        return bool(self._hooked("output"))

    def _aux(self, embeds, tokens: VisualTokens, plan):
        """The adapter's per-patch extras (Qwen3-VL's DeepStack features) merged by ``plan`` beside the embeds."""
        attach = getattr(self.adapter, "attach_aux", None)
        return embeds if attach is None or tokens.aux is None else attach(embeds, tokens, plan)

    def _with_lead(self, embeds, tokens: VisualTokens):
        """``tokens.lead`` (non-patch tokens the model feeds its LLM before the patches: a DINOv2 tower's
        registers, DeiT's distillation token), projected, in front of every image's visual embeddings as
        structural rows (source -1: no visual token, never pruned); ``embeds`` as they are when there is none."""
        if tokens.lead is None:
            return embeds
        lead = self.adapter.project(tokens.lead)
        rows = self.adapter._visual_rows(embeds)
        return VisualEmbeds([torch.cat([p.to(e.dtype), e]) for p, e in zip(lead, rows.embeds)],
                            [torch.cat([s.new_full((p.shape[0],), -1), s]) for p, s in zip(lead, rows.sources)])

    def _compress(self, tokens: VisualTokens, pixels: torch.Tensor | None):
        """The compressor on each of the model's crops with its share of the budget; the layout is the model's."""
        compressor, adapter = self._compress_with, self.adapter
        if isinstance(self.compressor, EncoderCompressor):
            return adapter.lay_out([compressor.compress_pixels(adapter, pixels, self.budget)])
        return adapter.lay_out([compressor.compress(adapter.part(tokens, c), k, adapter.project)
                                for c, k in enumerate(split_budget(self.budget, adapter.compressed_parts))])

    def budget_mapping(self) -> dict:
        """How this target's budget maps onto the compressor's own knobs (recorded with results)."""
        depth = {"in_llm": getattr(self.adapter, "num_llm_layers", None),
                 "in_encoder": getattr(self.adapter, "feature_layer", -1) + 1}.get(self.compressor.stage)
        return self.compressor.budget_mapping(self.budget, self.adapter.num_visual_tokens, depth)

    def candidate_logprobs(self, pixels, questions: Sequence[str], candidates: Sequence[str],
                           tokens: VisualTokens | None = None) -> torch.Tensor:
        def loglik(p, t=None):
            fwd = self.forward(p, t)
            return self.adapter.candidate_logprobs(fwd.embeds, questions, candidates, in_llm=fwd.in_llm)
        return self._output(loglik, pixels, tokens)

    def answer_loss(self, pixels, questions: Sequence[str], answers: Sequence[str],
                    tokens: VisualTokens | None = None) -> torch.Tensor:
        def loglik(p, t=None):
            fwd = self.forward(p, t)
            return -self.adapter.answer_loss(fwd.embeds, questions, answers, in_llm=fwd.in_llm)
        return -self._output(loglik, pixels, tokens)

    def _output(self, loglik, pixels, tokens: VisualTokens | None) -> torch.Tensor:
        """``loglik`` of the pipeline, through the output defenses (which re-run it on their own pixels)."""
        outputs = self._hooked("output")
        if not outputs:
            return loglik(pixels, tokens)
        for defense in outputs:
            loglik = partial(defense.aggregate, loglik)
        return loglik(pixels)

    @torch.no_grad()
    def detect(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B,) bool: inputs flagged by any detection defense (all False without one)."""
        flags = torch.zeros(pixels.shape[0], dtype=torch.bool)
        for defense in self._hooked("detection"):
            flags |= defense.flags(self, pixels).cpu()
        return flags

    @torch.no_grad()
    def predict(self, pixels, questions: Sequence[str], candidates: Sequence[str],
                tokens: VisualTokens | None = None) -> list[str]:
        """The candidate with the highest log-probability, per sample."""
        scores = self.candidate_logprobs(pixels, questions, candidates, tokens)
        return [candidates[i] for i in scores.argmax(-1).tolist()]

