"""Encoder-only campaigns (``mode: encoder``): the cheapest screening of a vision tower against grey-box attacks.

No LLM runs and no question is asked. Each adversarial image is crafted once per (sample, attack, ε) by a grey-box
attack (threat model "encoder gradients only"; a budget-aware one once per budget), encoded once, and every
compressor x budget plans on the clean and on the adversarial tokens. A record per sample x attack x ε x
compressor x budget (``"kind": "encoder"``) holds:

* ``kept_disruption`` -- kept-token distortion: mean 1 - cos(adversarial, clean) feature over the patches the
  compressor keeps on the adversarial image (a merged token counts as its largest-weight source), what CAGE's
  expected feature disruption maximises;
* ``kept_overlap`` -- |kept_adv ∩ kept_clean| / K;
* ``rank_spearman``, ``rank_kendall`` -- correlation of the clean and adversarial CLS-attention importance;
* ``full_token_disruption`` -- the same distortion over all N tokens (what a full-token attack maximises);
* ``linf``, ``l2``, ``seconds`` (crafting time per image) and the key fields (``defense`` "none",
  ``adaptive`` false).

:class:`EncoderCampaign` has the interface :func:`~robustvtc.campaign.runner.run_campaign` drives (units,
unit_keys, run_unit, chunks, task fingerprint, cells, mappings, example_attack), so the folder checks, lock,
ledger, resume and crash safety are the full campaigns' own. The model is a ``load_model`` name or LVLM
directory (its vision side: the adapter's ``encode``) or a bare vision encoder (:func:`load_encoder`).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AbstractSet, Iterator, Sequence

import torch

from ..errors import UserInputError
from ..target import EncodingCache
from .encoder_scope import list_images, refuse_attack, refuse_compressor
from .grid import (campaign_budgets, chunked, derived_seed, kept_disruption, kept_overlap, kept_sources, make_target,
                   rank_correlations, seeded, value_at)
from .records import NONE
from .scenario import Scenario
from .tasks import Item, Task, file_sha256

KIND = "encoder"
Cell = tuple[str, int]


@dataclass(frozen=True)
class EncoderUnit:
    chunk: int  # index of the fixed batch of samples
    attack: str  # attack label
    eps: float


@dataclass(frozen=True)
class EncoderCraft:
    """One adversarial image per sample: the budget a budget-aware attack is told (None: none), the cell a
    compressor-aware one is crafted against (None: none), the cells whose records use the image."""

    budget: int | None
    against: Cell | None
    cells: tuple[Cell, ...]


# ---------------------------------------------------------------------------------------------- the model
class EncoderAdapter:
    """A bare vision encoder (:class:`~robustvtc.models.towers.VisionEncoder`) with what targets, attacks and
    compressors read of an adapter: one token grid, a name, a family, the pixel space, image loading."""

    family = "encoder"
    compressed_parts = 1
    prompt_template = None

    def __init__(self, encoder, name: str | None = None):
        self.encoder = encoder
        self.name = name or encoder.name
        self.num_visual_tokens = encoder.num_visual_tokens
        self.capabilities = frozenset(encoder.capabilities)
        self.feature_layer = encoder.feature_layer
        self.num_vision_layers = encoder.reader.num_layers
        self.grid = encoder.grid
        self.device, self.dtype = encoder.device, encoder.dtype

    @property
    def input_size(self) -> tuple[int, int]:
        return self.encoder.input_size

    @property
    def pixel_space(self) -> dict:
        h, w = self.input_size
        return {"resolution": [h, w], "range": [0.0, 1.0], "layout": "RGB, (B, 3, H, W) float",
                "normalization": {"mean": self.encoder._mean.flatten().tolist(),
                                  "std": self.encoder._std.flatten().tolist(),
                                  "applied": "inside the encoder, after any perturbation"},
                "model_input": f"{h}x{w} pixels, {self.grid[0]}x{self.grid[1]} patches"}

    def check_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder.check_pixels(pixels)

    def encode(self, pixels: torch.Tensor, signal_layers: Sequence[int] = (), validate: bool = True):
        return self.encoder.encode(pixels, signal_layers, validate)

    def load_image(self, image) -> torch.Tensor:
        from ..models.preprocess import fit_image

        return fit_image(image, self.input_size)

    def part(self, tokens, index: int):
        return tokens

    def __repr__(self) -> str:
        return f"EncoderAdapter({self.name}, {self.num_visual_tokens} tokens)"


def load_encoder_model(scenario: Scenario):
    """The model of an encoder-only campaign: an LVLM adapter (``load_model`` name, or a directory / hub id whose
    config is an LVLM family: its vision side is used) or a bare vision encoder wrapped as :class:`EncoderAdapter`."""
    from ..models import ADAPTERS, BUILTIN_MODELS, load_model

    name = scenario.model
    kwargs = dict(scenario.model_kwargs)
    if name in BUILTIN_MODELS:
        return load_model(name, device=scenario.device, dtype=scenario.dtype, **kwargs)
    model_type = None
    try:
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(str(Path(name).expanduser()) if Path(name).expanduser().exists()
                                                else name).model_type
    except (OSError, ValueError):
        pass  # load_model says why in one line
    if model_type is None or model_type in ADAPTERS:
        return load_model(name, device=scenario.device, dtype=scenario.dtype, **kwargs)
    from ..models.towers import load_encoder

    source = Path(name).expanduser()
    try:
        encoder = load_encoder(str(source) if source.exists() else name, device=scenario.device,
                               dtype=scenario.dtype, **kwargs)
    except TypeError as exc:
        raise UserInputError(f"model_kwargs: {str(exc).splitlines()[0]}; accepted for a bare vision encoder: "
                             "feature_layer, image_mean, image_std") from None
    return EncoderAdapter(encoder, name)


# ---------------------------------------------------------------------------------------------- the data
class ImageTask:
    """``{source: images, path: DIR}``: the first ``samples`` image files of the folder (sorted by name; the
    record's ``sample`` is the file name), no questions."""

    def __init__(self, spec, samples: int):
        self.spec = spec
        files = list_images(spec.path)
        if len(files) < samples:
            raise UserInputError(f"data: {spec.path} holds {len(files)} images but samples is {samples}; "
                                 f"accepted: samples <= {len(files)}")
        self.items = [Item(p.name, "image", "", "", "", (), p) for p in files[:samples]]
        from ..images import open_image

        for item in self.items:  # every image decodes (size, mode, truncation) before the first unit
            open_image(item.source)

    def fingerprint(self) -> dict:
        """The images by content (by sample id, so the folder may move), and where each was read."""
        rows = [str(i.id) for i in self.items]
        return {"rows": hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16],
                "images": {str(i.id): file_sha256(i.source) for i in self.items},
                "image_files": {str(i.id): str(i.source) for i in self.items}}

    def pixels(self, items: Sequence[Item], adapter) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] at the model's input resolution, on its device."""
        pixels = torch.cat([adapter.load_image(i.source) for i in items])
        return adapter.check_pixels(pixels).to(adapter.device)


# ---------------------------------------------------------------------------------------------- the campaign
class EncoderCampaign:
    """An encoder-only scenario bound to a loaded model and its images; :meth:`run_unit` turns a unit into
    records. Same interface as :class:`~robustvtc.campaign.runner.Campaign` for the runner."""

    _chunk: tuple[int, torch.Tensor, EncodingCache] | None = None  # the last chunk: index, pixels, encodings

    def __init__(self, scenario: Scenario, adapter=None, output: str | Path | None = None):
        from ..attacks import attack_class

        if scenario.mode != KIND:
            raise UserInputError(f"scenario {scenario.name}: mode {scenario.mode!r}; accepted: mode: encoder for an "
                                 "encoder-only campaign")
        for spec in scenario.attacks:  # a Scenario built in Python skips the parser's checks
            problem = refuse_attack(spec.name)
            if problem:
                raise UserInputError(f"attacks ({spec.label}): {problem}")
        for label in scenario.compressors:
            if label != NONE:
                problem = refuse_compressor(label, scenario.compressor_spec(label)[0])
                if problem:
                    raise UserInputError(f"compressors: {problem}")
        self.scenario = scenario
        self.output = Path(output) if output is not None else None
        self.adapter = adapter if adapter is not None else load_encoder_model(scenario)
        if getattr(self.adapter, "compressed_parts", 1) != 1:
            raise UserInputError(f"model {self.adapter.name}: {self.adapter.family} compresses each of its "
                                 f"{self.adapter.compressed_parts} crops; accepted for an encoder-only campaign: a "
                                 "model with one token grid (LLaVA-1.5-style, or a bare vision encoder)")
        self.task = ImageTask(scenario.data, scenario.samples) if scenario.data.source == "images" else \
            Task(scenario.data, scenario.samples)
        self.chunks = chunked(self.task.items, scenario.batch_size)
        n = self.adapter.num_visual_tokens
        self.budgets = campaign_budgets(scenario.budgets, n)
        self.cells: list[Cell] = [(c, b) for c in scenario.compressors if c != NONE for b in self.budgets]
        if not self.cells:
            raise UserInputError("compressors: none besides 'none'; accepted: one or more compressors that plan "
                                 "from the encoder's tokens (an encoder screening measures what they keep)")
        self.mappings = {}
        self.signal_layers: set[int] = set()
        for cell in self.cells:  # refuses compressors this model cannot run (CLS attention, ...), before any work
            try:
                target = make_target(self.adapter, *cell, scenario=scenario)
            except UserInputError as exc:
                raise UserInputError(f"compressors: {exc}") from None
            self.mappings[cell] = target.budget_mapping()
            self.signal_layers.update(target.signal_layers)
        self.defenses = [NONE]
        self.attacks = {a.label: a for a in scenario.attacks}
        self.threats = {a.label: attack_class(a.name).threat for a in scenario.attacks}
        self.crafts = {a.label: self._dry_run(a) for a in scenario.attacks}

    # ------------------------------------------------------------------ planning
    def _dry_run(self, spec) -> list[EncoderCraft]:
        """The crafts of an attack, each attack constructed once so bad options fail before any work."""
        threat = self.threats[spec.label]
        if threat.compressor_known:
            plan = [EncoderCraft(cell[1], cell, (cell,)) for cell in self.cells]
        elif threat.budget_known:
            plan = [EncoderCraft(b, None, tuple(c for c in self.cells if c[1] == b)) for b in self.budgets]
        else:
            plan = [EncoderCraft(None, None, tuple(self.cells))]
        for craft in plan:
            try:
                self._attack(spec, spec.eps[0], craft)
            except UserInputError as exc:
                raise UserInputError(f"attacks ({spec.label}): {exc}") from None
        return plan

    def _attack(self, spec, eps: float, craft: EncoderCraft, seed: int = 0):
        from ..attacks import get_attack

        target = make_target(self.adapter, *(craft.against or (NONE, None)), seed=seed, scenario=self.scenario)
        opts = {"seed": self.scenario.seed, **spec.options, "eps": eps}
        if craft.budget is not None and craft.against is None:
            opts["budget"] = craft.budget
        if self._chunk is not None:
            target.encodings = self._chunk[2]  # the clean reference: read, not encoded again
        return get_attack(spec.name, target, **opts)

    def example_attack(self, label: str):
        """The attack ``label`` as constructed for its first image set (its resolved hyper-parameters)."""
        spec = self.attacks[label]
        return self._attack(spec, spec.eps[0], self.crafts[label][0])

    def units(self) -> list[EncoderUnit]:
        """Chunk-major, so a chunk's clean encoding is computed once in a local run."""
        return [EncoderUnit(i, a.label, e) for i in range(len(self.chunks)) for a in self.scenario.attacks
                for e in a.eps]

    def _groups(self, unit: EncoderUnit) -> list[tuple[EncoderCraft, list[tuple]]]:
        items = self.chunks[unit.chunk]
        return [(craft, [(i.id, unit.attack, unit.eps, c, b, NONE, False) for c, b in craft.cells for i in items])
                for craft in self.crafts[unit.attack]]

    def unit_keys(self, unit: EncoderUnit) -> list[tuple]:
        return [k for _, keys in self._groups(unit) for k in keys]

    # ------------------------------------------------------------------ running
    def _pixels(self, chunk: int) -> torch.Tensor:
        if self._chunk is None or self._chunk[0] != chunk:
            self._chunk = None
            pixels = self.task.pixels(self.chunks[chunk], self.adapter)
            self._chunk = (chunk, pixels, EncodingCache(pixels))
        return self._chunk[1]

    def _layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.signal_layers))

    def run_unit(self, unit: EncoderUnit, done: AbstractSet[tuple] = frozenset()) -> Iterator[dict]:
        """The unit's records whose key is not in ``done``, each yielded as soon as it is computed."""
        items = self.chunks[unit.chunk]
        groups = [g for g in self._groups(unit) if not set(g[1]) <= done]
        if not groups:
            return
        clean_px = self._pixels(unit.chunk)
        with torch.no_grad():
            clean = self._chunk[2].encode(self.adapter, clean_px, self._layers())
        clean_plans: dict[Cell, torch.Tensor] = {}
        spec = self.attacks[unit.attack]
        threat = self.threats[unit.attack].describe()
        for craft, _ in groups:
            seed = self._seed("craft", unit, craft)
            with seeded(seed):
                attack = self._attack(spec, unit.eps, craft, seed)
                start = time.perf_counter()
                adv_px = attack(clean_px).adv
                seconds = (time.perf_counter() - start) / len(items)
            with torch.no_grad():
                adv = self.adapter.encode(adv_px, self._layers())
            delta = (adv_px - clean_px).flatten(1).float()
            linf, l2 = delta.abs().amax(dim=1).tolist(), delta.norm(dim=1).tolist()
            everything = torch.ones(adv.features.shape[:2], dtype=torch.bool)
            full = kept_disruption(clean, adv, everything)
            spearman, kendall = rank_correlations(clean, adv)
            for cell in craft.cells:
                if cell not in clean_plans:
                    clean_plans[cell] = self._kept(cell, clean, self._seed("clean", unit.chunk, *cell))
                kept = self._kept(cell, adv, self._seed("adv", unit, craft, *cell))
                overlap = kept_overlap(clean_plans[cell], kept)
                disruption = kept_disruption(clean, adv, kept)
                for b, item in enumerate(items):
                    key = (item.id, unit.attack, unit.eps, cell[0], cell[1], NONE, False)
                    if key in done:
                        continue
                    yield {"kind": KIND, "sample": item.id, "attack": unit.attack, "attack_threat": threat,
                           "eps": unit.eps, "steps": attack.steps, "compressor": cell[0], "budget": cell[1],
                           "defense": NONE, "adaptive": False, "kept_disruption": value_at(disruption, b),
                           "kept_overlap": value_at(overlap, b), "rank_spearman": value_at(spearman, b),
                           "rank_kendall": value_at(kendall, b), "full_token_disruption": value_at(full, b),
                           "linf": linf[b], "l2": l2[b], "seconds": seconds, "budget_mapping": self.mappings[cell]}

    @torch.no_grad()
    def _kept(self, cell: Cell, tokens, seed: int) -> torch.Tensor:
        """(B, N) bool: the patches the compressor of ``cell`` keeps on ``tokens`` (a fresh compressor, a
        randomised one seeded with ``seed``)."""
        with seeded(seed):
            target = make_target(self.adapter, *cell, seed=seed, scenario=self.scenario)
            plan = target.compressor.plan(self.adapter.part(tokens, 0), cell[1])
        return kept_sources(plan)

    def _seed(self, *parts) -> int:
        return derived_seed(self.scenario.seed, *parts)




