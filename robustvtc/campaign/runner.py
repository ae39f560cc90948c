"""Run a scenario: adversarial images built once, evaluated on the whole grid, one JSON record per line.

Work is split into units -- a fixed chunk of ``batch_size`` samples x one attack x one ε (plus one "clean"
unit per chunk). Inside a unit each adversarial image is built once for what its attack may know
(:class:`~robustvtc.attacks.base.ThreatModel`):

* budget- and compressor-agnostic attacks (grey-box fulltoken, cage): once per sample, evaluated on every
  compressor x budget;
* budget-aware attacks (known_budget): once per budget, evaluated on every compressor at that budget;
* compressor-aware attacks (whitebox, stealth): once per compressor x budget cell, evaluated on that cell.

Every image is also evaluated on the full-token model (``full_token_correct``) and, non-adaptively, under
every defense configuration; with ``adaptive`` it is crafted again against each defended target. An
evaluation encodes the batch once and shares the visual tokens across the grid (a target with an input
defense re-encodes its transformed pixels). Records are appended and flushed one line at a time, so a
killed run loses only the records in flight; ``--resume`` skips every finished key and refuses a scenario
whose hash changed.

Determinism: chunks never change composition, each attack seeds itself, and every evaluation builds its
targets afresh under a seed derived from the scenario seed and what is evaluated -- so a unit gives the
same records whether or not the units before it ran in this process.
"""
from __future__ import annotations

import inspect
import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import AbstractSet, Iterator, Sequence

import torch

from ..errors import UserInputError
from ..safe_io import (LEDGER_NAME, FolderLock, atomic_write_bytes, atomic_write_text, note_written, read_ledger,
                       refuse_symlink, remove_stale_temps)
from .folder import OWN, check_folder, check_report_folder, check_resume, clear, legacy_files
from .executor import Executor, make_executor
from .progress import Progress
from .grid import (CellResult, campaign_budgets, chunked, derived_seed, evaluate_grid, kept_disruption, kept_overlap,
                   make_target, rank_correlations, seeded, value_at)
from .records import (CLEAN, EXAMPLES, IMAGES, KEY_FIELDS, MANIFEST, NONE, RESULTS, ResultsWriter, example_key,
                      png_bytes, read_example_keys, read_records, record_key)
from .scenario import Scenario, defense_registry
from ..target import EncodingCache
from .tasks import Item, Task


Cell = tuple[str, int]  # (compressor, budget)


@dataclass(frozen=True)
class WorkUnit:
    chunk: int  # index of the fixed batch of samples
    attack: str  # attack label, or "clean"
    eps: float


@dataclass(frozen=True)
class Craft:
    """One adversarial image per sample: the cell the attack is given (None = the full-token model), the
    budget a budget-aware attack is told, the cells whose records use the image."""

    against: Cell | None
    budget: int | None
    cells: tuple[Cell, ...]


class Campaign:
    """A scenario bound to a loaded model and its data; :meth:`run_unit` turns a work unit into records."""

    _chunk: tuple[int, torch.Tensor, EncodingCache] | None = None  # the last chunk: index, pixels, encodings

    def __init__(self, scenario: Scenario, adapter=None, output: str | Path | None = None):
        from ..attacks import attack_class
        from ..models import load_model

        self.scenario = scenario
        self.output = Path(output) if output is not None else None
        self.adapter = adapter if adapter is not None else load_model(
            scenario.model, device=scenario.device, dtype=scenario.dtype, **scenario.model_kwargs)
        self.task = Task(scenario.data, scenario.samples)
        self.chunks = chunked(self.task.items, scenario.batch_size)
        n = self.adapter.num_visual_tokens
        self.budgets = campaign_budgets(scenario.budgets, n)
        self.cells: list[Cell] = [(NONE, n)] + [(c, b) for c in scenario.compressors if c != NONE for b in self.budgets]
        self.full = self.cells[0]
        self.mappings = {}
        for cell in self.cells:  # refuses compressors this model cannot run, before any work
            try:
                self.mappings[cell] = make_target(self.adapter, *cell, scenario=scenario).budget_mapping()
            except UserInputError as exc:
                raise UserInputError(f"compressors: {exc}") from None
        self._defense_specs = {d.label: d for d in scenario.defenses}
        self._thresholds: dict[tuple, float] = {}
        self.defenses = [NONE, *self._defense_specs]
        self.defense_cells = {d: self._applicable(d) for d in self.defenses}
        self.attacks = {a.label: a for a in scenario.attacks}
        self.threats = {a.label: attack_class(a.name).threat for a in scenario.attacks}
        self.crafts = {a.label: self._dry_run(a) for a in scenario.attacks}
        self._clean_cache: dict[tuple, dict[Cell, CellResult]] = {}
        self._noted: set[str] | None = None  # the output folder's ledger, loaded on first use
        self._examples: set[tuple] | None = None  # keys already in examples.jsonl, loaded on first use

    # ------------------------------------------------------------------ planning
    def _applicable(self, defense: str) -> list[Cell]:
        """The cells a defense configuration can act on (a score defense needs a ranking compressor, ...)."""
        if defense == NONE:
            return list(self.cells)
        cells = []
        for cell in self.cells:
            try:
                make_target(self.adapter, *cell, defenses=self._defense_objects(defense, 0, cell, calibrated=False),
                            scenario=self.scenario)
            except UserInputError as exc:
                if cell == self.full:  # full_token_correct needs the full-token model under every defense
                    raise UserInputError(f"defenses ({defense}): {exc}") from None
                continue
            cells.append(cell)
        return cells

    def _dry_run(self, spec) -> list[Craft]:
        """The crafts of an attack, each attack constructed once so bad options fail before any work."""
        threat = self.threats[spec.label]
        compressed = [c for c in self.cells if c[0] != NONE]
        if threat.compressor_known:
            plan = [Craft(cell, None, (cell,)) for cell in self.cells]
        elif threat.budget_known:
            plan = [Craft(None, b, tuple(c for c in compressed if c[1] == b)) for b in self.budgets]
        else:
            plan = [Craft(None, None, tuple(self.cells))]
        kept = []
        for craft in plan:
            try:
                self._attack(spec, spec.eps[0], craft, NONE)
            except UserInputError as exc:
                if craft.against == self.full:
                    continue  # e.g. stealth needs compression: no full-token cell for it
                raise UserInputError(f"attacks ({spec.label}): {exc}") from None
            kept.append(craft)
        if not kept:
            raise UserInputError(f"attacks ({spec.label}): no compressor x budget of the scenario it applies to; "
                                 "accepted: add a compressor with a budget below the token count")
        return kept

    def _attack(self, spec, eps: float, craft: Craft, against: str, seed: int = 0):
        """The attack of one craft; crafted ``against`` a defense, with EOT when that target is randomised."""
        from ..attacks import attack_class, get_attack
        from ..defenses import adaptive_attack_options

        cell = craft.against or self.full
        target = make_target(self.adapter, *cell, seed=seed, defenses=self._defense_objects(against, seed, cell),
                             scenario=self.scenario)
        opts = {**adaptive_attack_options(target, self.scenario.eot_samples), "seed": self.scenario.seed,
                **spec.options, "eps": eps}
        if craft.budget is not None:
            opts["budget"] = craft.budget
        if getattr(attack_class(spec.name), "needs_candidates", False):  # torchattacks: a classifier over answers
            opts["candidates"] = self._candidates()
        if self._chunk is not None:
            target.encodings = self._chunk[2]  # the clean reference: read, not encoded again
        return get_attack(spec.name, target, **opts)

    def _candidates(self) -> list[str]:
        """The closed answer set of the task (what torchattacks attacks classify over)."""
        source = self.scenario.data.source
        if source == "synthetic":
            from ..data.synthetic import ANSWERS

            return list(ANSWERS)
        if source == "multiple_choice":
            from ..scoring import option_letters

            return list(option_letters(max(i.options for i in self.task.items)))
        raise UserInputError(f"torchattacks attacks classify over a closed answer set; data source {source!r} has "
                             "open answers; accepted: synthetic or multiple_choice data, or the whitebox attack")

    def example_attack(self, label: str):
        """The attack ``label`` as constructed for its first image set (its resolved hyper-parameters)."""
        spec = self.attacks[label]
        return self._attack(spec, spec.eps[0], self.crafts[label][0], NONE)

    def _defense_objects(self, label: str, seed: int, cell: Cell, calibrated: bool = True) -> list:
        """Fresh objects of a defense configuration: randomised ones seeded with ``seed``, detectors with the
        threshold calibrated for ``cell`` (``calibrated=False``: none, for checks that do not detect)."""
        if label == NONE:
            return []
        from ..defenses import DetectionDefense

        spec = self._defense_specs[label]
        cls = defense_registry().get(spec.name)
        options = dict(spec.options)
        if "seed" in inspect.signature(cls).parameters:
            options.setdefault("seed", seed)
        if calibrated and issubclass(cls, DetectionDefense) and options.get("threshold") is None:
            options["threshold"] = self._threshold(label, cell)
        return [cls(**options)]

    def _threshold(self, label: str, cell: Cell) -> float:
        """A detector's threshold for ``cell``, calibrated on clean images at the detector's target FPR:
        the synthetic task's validation split, or the campaign's own items for file data (in-sample)."""
        if (label, cell) not in self._thresholds:
            if self.scenario.data.source == "synthetic":
                calibration = Task(replace(self.scenario.data, split="val"), min(self.scenario.samples, 64))
            else:
                calibration = self.task
            pixels = calibration.pixels(calibration.items[:64], self.adapter)
            detector = self._defense_objects(label, 0, cell, calibrated=False)[0]
            target = make_target(self.adapter, *cell, defenses=[detector], scenario=self.scenario)
            self._thresholds[(label, cell)] = detector.calibrate(target, pixels)
        return self._thresholds[(label, cell)]

    def _plan(self, label: str) -> Iterator[tuple[Craft, str, list[str]]]:
        """(craft, defense crafted against, defenses evaluated on) for every image set of an attack."""
        adaptive = self.defenses[1:] if self.scenario.adaptive else []
        for craft in self.crafts[label]:
            yield craft, NONE, self.defenses
            for d in adaptive:
                if (craft.against or self.full) in self.defense_cells[d]:
                    yield craft, d, [d]

    def units(self) -> list[WorkUnit]:
        """Chunk-major, so a chunk's clean reference is computed once in a local run."""
        return [WorkUnit(i, label, eps) for i in range(len(self.chunks))
                for label, eps in [(CLEAN, 0.0), *((a.label, e) for a in self.scenario.attacks for e in a.eps)]]

    def unit_keys(self, unit: WorkUnit) -> list[tuple]:
        return [k for group in self._groups(unit) for k in group[-1]]

    def _cells(self, cells: Sequence[Cell], defense: str) -> list[Cell]:
        return [c for c in cells if c in self.defense_cells[defense]]

    def _groups(self, unit: WorkUnit) -> list[tuple]:
        """(craft, against, evaluated defenses, keys) per image set of a unit; craft None for clean."""
        items = self.chunks[unit.chunk]

        def keys(cells, defenses, adaptive):
            return [(i.id, unit.attack, unit.eps, c, b, d, adaptive)
                    for d in defenses for c, b in self._cells(cells, d) for i in items]
        if unit.attack == CLEAN:
            return [(None, NONE, self.defenses, keys(self.cells, self.defenses, False))]
        return [(craft, against, evals, keys(craft.cells, evals, against != NONE))
                for craft, against, evals in self._plan(unit.attack)]

    # ------------------------------------------------------------------ running
    def run_unit(self, unit: WorkUnit, done: AbstractSet[tuple] = frozenset()) -> Iterator[dict]:
        """The unit's records whose key is not in ``done``, each yielded as soon as it is computed."""
        items = self.chunks[unit.chunk]
        groups = [g for g in self._groups(unit) if not set(g[-1]) <= done]
        if not groups:
            return
        clean_px = self._pixels(unit.chunk, items)
        if unit.attack == CLEAN:
            for d in self.defenses:
                clean = self._clean(unit.chunk, clean_px, items, d)
                yield from self._records(unit, items, d, False, self._cells(self.cells, d), clean, clean, clean_px,
                                         clean_px, 0.0, done)
            return
        spec = self.attacks[unit.attack]
        for craft, against, evals, _ in groups:
            seed = self._seed("craft", unit, craft, against)
            with seeded(seed):
                attack = self._attack(spec, unit.eps, craft, against, seed)
                start = time.perf_counter()
                adv = attack(clean_px, [i.prompt for i in items], [i.answer for i in items]).adv
                seconds = (time.perf_counter() - start) / len(items)
            if self.scenario.save_images and self.output is not None:
                self._save_images(unit, items, craft, against, adv)
            for d in evals:
                cells = self._cells(craft.cells, d)
                clean = self._clean(unit.chunk, clean_px, items, d)
                result = self._evaluate(list(dict.fromkeys([*cells, self.full])), adv, items, d,
                                        self._seed("eval", unit, craft, against, d))
                if d == NONE and against == NONE:
                    self._save_examples(unit, items, cells, clean, result, clean_px, adv)
                yield from self._records(unit, items, d, against != NONE, cells, result, clean, adv, clean_px,
                                         seconds, done, attack)

    def _pixels(self, chunk: int, items: Sequence[Item]) -> torch.Tensor:
        """The chunk's clean pixels, decoded and resized once for all its units in this process, with the cache of
        their encodings (the clean evaluation's and every attack's clean reference); the last chunk is kept."""
        if self._chunk is None or self._chunk[0] != chunk:
            self._chunk = None  # free the previous chunk's first
            pixels = self.task.pixels(items, self.adapter)
            self._chunk = (chunk, pixels, EncodingCache(pixels))
        return self._chunk[1]

    def _clean(self, chunk: int, pixels: torch.Tensor, items: Sequence[Item], defense: str) -> dict[Cell, CellResult]:
        key = (chunk, defense)
        if key not in self._clean_cache:
            self._clean_cache = {k: v for k, v in self._clean_cache.items() if k[0] == chunk}
            seed = self._seed("clean", chunk, defense)
            encodings = self._chunk[2] if self._chunk is not None and self._chunk[0] == chunk else None
            self._clean_cache[key] = self._evaluate(self.defense_cells[defense], pixels, items, defense, seed,
                                                    encodings)
        return self._clean_cache[key]

    def _evaluate(self, cells: Sequence[Cell], pixels: torch.Tensor, items: Sequence[Item], defense: str,
                  seed: int, encodings: EncodingCache | None = None) -> dict[Cell, CellResult]:
        with seeded(seed):
            targets = [make_target(self.adapter, *cell, seed=seed, defenses=self._defense_objects(defense, seed, cell),
                                   scenario=self.scenario) for cell in cells]
            results = evaluate_grid(targets, pixels, lambda t, px, tok: self.task.predict(t, px, items, tok),
                                    keep_maps=True, encodings=encodings)
        return dict(zip(cells, results))

    def _records(self, unit: WorkUnit, items: Sequence[Item], defense: str, adaptive: bool, cells: Sequence[Cell],
                 adv: dict[Cell, CellResult], clean: dict[Cell, CellResult], adv_px: torch.Tensor,
                 clean_px: torch.Tensor, seconds: float, done: AbstractSet[tuple], attack=None) -> Iterator[dict]:
        delta = (adv_px - clean_px).flatten(1).float()
        linf, l2 = delta.abs().amax(dim=1).tolist(), delta.norm(dim=1).tolist()
        full_ok = [self.task.correct(item, p) for item, p in zip(items, adv[self.full].predictions)]
        clean_full_ok = [self.task.correct(item, p) for item, p in zip(items, clean[self.full].predictions)]
        ranks: dict[tuple[int, int], tuple] = {}
        for cell in cells:
            a, c = adv[cell], clean[cell]
            pair = (id(c.tokens), id(a.tokens))
            if pair not in ranks:
                ranks[pair] = rank_correlations(c.tokens, a.tokens)
            spearman, kendall = ranks[pair]
            overlap = kept_overlap(c.kept, a.kept)
            disruption = kept_disruption(c.tokens, a.tokens, a.kept)
            for b, item in enumerate(items):
                key = (item.id, unit.attack, unit.eps, cell[0], cell[1], defense, adaptive)
                if key in done:
                    continue
                pred = a.predictions[b]
                correct, fields = self.task.judge(item, pred)  # hf benchmarks: score, category, question_id
                yield {
                    "sample": item.id, "qtype": item.qtype, "question": item.question, "answer": item.answer,
                    "attack": unit.attack, "attack_threat": attack.threat.describe() if attack else None,
                    "eps": unit.eps, "steps": attack.steps if attack else 0,
                    "compressor": cell[0], "budget": cell[1], "defense": defense, "adaptive": adaptive,
                    "prediction": pred, "correct": correct,
                    "clean_correct": self.task.correct(item, c.predictions[b]),
                    "full_token_correct": full_ok[b], "clean_full_token_correct": clean_full_ok[b],
                    "flagged": a.flagged[b],
                    "kept_overlap": value_at(overlap, b), "rank_spearman": value_at(spearman, b),
                    "rank_kendall": value_at(kendall, b), "kept_disruption": value_at(disruption, b),
                    "linf": linf[b], "l2": l2[b], "seconds": seconds, "budget_mapping": self.mappings[cell],
                    **fields,
                }

    # ------------------------------------------------------------------ side files
    def _save_images(self, unit: WorkUnit, items, craft: Craft, against: str, adv: torch.Tensor) -> None:
        where = "all" if craft.against is None else f"{craft.against[0]}@{craft.against[1]}"
        where += f"-K{craft.budget}" if craft.budget is not None else ""
        names = [f"{_slug(item.id)}_{_slug(unit.attack)}_eps{unit.eps:.5f}_{where}_vs-{_slug(against)}.png"
                 for item in items]
        for name, image in zip(names, adv):
            self._write_png(f"{IMAGES}/{name}", image)

    def _save_examples(self, unit: WorkUnit, items, cells, clean, adv, clean_px, adv_px) -> None:
        """Kept-token maps of the first ``examples`` samples (clean vs adversarial), for the report."""
        first = unit.chunk * self.scenario.batch_size
        rows = [b for b in range(len(items)) if first + b < self.scenario.examples]
        if self.output is None or not rows:
            return
        lines = []
        for b in rows:
            item = items[b]
            stem = f"{_slug(item.id)}_{_slug(unit.attack)}_eps{unit.eps:.5f}"
            self._write_png(f"{EXAMPLES}/{_slug(item.id)}_clean.png", clean_px[b])
            self._write_png(f"{EXAMPLES}/{stem}.png", adv_px[b])
            for cell in cells:
                a, c = adv[cell], clean[cell]
                grid = list(c.tokens.grid)
                if cell[0] == NONE or a.kept is None or c.kept is None or grid[0] * grid[1] != a.kept.shape[1]:
                    continue
                lines.append({"sample": item.id, "attack": unit.attack, "eps": unit.eps, "compressor": cell[0],
                              "budget": cell[1], "grid": grid, "clean_image": f"{_slug(item.id)}_clean.png",
                              "adv_image": f"{stem}.png",
                              "kept_clean": c.kept[b].nonzero().flatten().tolist(),
                              "kept_adv": a.kept[b].nonzero().flatten().tolist()})
        self._append_examples(lines)

    # side files go through these three: a distributed executor's worker ships them to the driver instead
    # (robustvtc.campaign.ray_executor), which writes them with write_side_files -- one writer per folder
    def _write_png(self, name: str, image: torch.Tensor) -> None:
        """A PNG at ``name`` (relative to the output folder), noted in the ledger before it is written."""
        self._note([name])
        atomic_write_bytes(self.output / name, png_bytes(image), note=False)

    def _append_examples(self, lines: list[dict]) -> None:
        """Append kept-token map entries to examples.jsonl, each key once (a unit run again on resume)."""
        if not lines:
            return
        name = f"{EXAMPLES}/examples.jsonl"
        path = self.output / name
        path.parent.mkdir(parents=True, exist_ok=True)
        self._note([name])
        refuse_symlink(path)
        if self._examples is None:
            self._examples = read_example_keys(path, repair=True)
        lines = [line for line in lines if example_key(line) not in self._examples]  # a unit run again (resume)
        if lines:
            with open(path, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(line) + "\n" for line in lines))
            self._examples.update(example_key(line) for line in lines)

    def write_side_files(self, files: Sequence[tuple]) -> None:
        """Write what a worker's unit shipped: ("png", name, PNG bytes) and ("examples", entries), in order."""
        for entry in files:
            if entry[0] == "png":
                self._note([entry[1]])
                atomic_write_bytes(self.output / entry[1], entry[2], note=False)
            elif entry[0] == "examples":
                self._append_examples(entry[1])

    def _note(self, names: Sequence[str]) -> None:
        """Note files in the output folder's ledger before writing them (what --overwrite may remove)."""
        if self._noted is None:
            self._noted = set(read_ledger(self.output))
        new = [n for n in names if n not in self._noted]
        if new:
            note_written(self.output, new)
            self._noted.update(new)

    def _seed(self, *parts) -> int:
        return derived_seed(self.scenario.seed, *parts)


def _slug(value) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "-" for ch in str(value))


# ---------------------------------------------------------------------------------------------- results files


def _git_revision() -> dict:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return {"revision": None}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=30)
        return {"revision": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.TimeoutExpired):
        return {"revision": None}


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for name in ("robustvtc", "torch", "transformers", "numpy", "pandas", "scipy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _manifest(campaign: Campaign) -> dict:
    """What reproduces the run: the resolved scenario and its hash, versions, git revision, model, attacks."""
    from .scenario import schedule_differences

    s, adapter = campaign.scenario, campaign.adapter
    attacks, schedule = {}, {}
    for spec in s.attacks:
        attack = campaign.example_attack(spec.label)
        attacks[spec.label] = {"name": spec.name, "role": getattr(attack, "role", "other"), "eps": list(spec.eps),
                               "threat": asdict(attack.threat),
                               "params": {k: v for k, v in attack.hyperparameters().items() if k != "eps"}}
        alpha = spec.options.get("alpha")  # None = eps/4 for each radius (what the attack resolves it to)
        schedule[spec.label] = {"steps": attack.steps, "alpha": "eps/4" if alpha is None else alpha,
                                "alpha_per_eps": [e / 4 if alpha is None else alpha for e in spec.eps],
                                "random_start": attack.random_start}
    shared = {**s.schedule, "alpha": "eps/4" if s.schedule.get("alpha") is None else s.schedule["alpha"]}
    return json.loads(json.dumps({
        "format": "robustvtc-campaign/1", "scenario": s.to_dict(), "scenario_hash": s.hash(),
        "seed": s.seed, "dtype": s.dtype, "device": s.device, "batch_size": s.batch_size,
        "versions": _versions(), "git": _git_revision(), "python": sys.version.split()[0],
        "platform": platform.platform(), "torch_threads": torch.get_num_threads(),
        "model": {"name": adapter.name, "family": getattr(adapter, "family", None),
                  "num_visual_tokens": adapter.num_visual_tokens, "pixel_space": adapter.pixel_space,
                  "prompt_template": getattr(adapter, "prompt_template", None),
                  "prompt_source": getattr(adapter, "prompt_source", None)},
        "cells": [list(c) for c in campaign.cells], "budget_mappings": {f"{c}@{b}": m for (c, b), m in
                                                                           campaign.mappings.items()},
        "defenses": campaign.defenses, "attacks": attacks,
        "schedule": schedule, "schedule_differences": schedule_differences(schedule, shared),
        "units": len(campaign.units()),
        "records_expected": sum(len(campaign.unit_keys(u)) for u in campaign.units()),
    }, default=str))


def make_campaign(scenario: Scenario, adapter=None, output: str | Path | None = None):
    """The campaign of a scenario: :class:`Campaign`, or for ``mode: encoder`` an
    :class:`~robustvtc.campaign.encoder.EncoderCampaign` (the same interface: units, keys, records)."""
    if scenario.mode == "encoder":
        from .encoder import EncoderCampaign

        return EncoderCampaign(scenario, adapter, output=output)
    return Campaign(scenario, adapter, output=output)


def run_campaign(scenario: Scenario, *, output: str | Path | None = None, resume: bool = False,
                 overwrite: bool = False, quiet: bool = False, adapter=None, executor: Executor | None = None,
                 log=None, allow_existing: bool = False, report: bool = False) -> Path:
    """Run (or resume) a campaign; returns its output folder holding results.jsonl and manifest.json
    (and ``report/`` with ``report``, written before the folder's lock is released: no other writer between).

    The folder is checked before the model loads and again under its lock (one writer per folder):
    an existing campaign needs ``resume`` (same record-relevant keys and data contents) or ``overwrite``
    (removes exactly the files campaigns wrote there); a folder holding other files needs ``allow_existing``.
    Every input (model, options, data rows, images) is validated before anything is written."""

    out = Path(output or scenario.output)
    manifest_path, results_path = out / MANIFEST, out / RESULTS
    check_folder(out, scenario, resume, overwrite, allow_existing)  # fail fast, before loading the model
    if report:
        check_report_folder(out, out / "report")
    executor = executor or make_executor(scenario.executor)  # executor: ray without ray installed fails here
    if adapter is None and hasattr(executor, "driver_adapter"):
        adapter = executor.driver_adapter(scenario)  # e.g. Ray: the driver plans on the CPU, workers hold GPUs
    campaign = make_campaign(scenario, adapter, output=out)
    data = campaign.task.fingerprint()
    with FolderLock(out, log):
        previous = check_folder(out, scenario, resume, overwrite, allow_existing)
        if previous is not None:
            check_resume(out, previous, scenario, data)
        if report:
            check_report_folder(out, out / "report")  # before anything is removed or written
        if overwrite:
            clear(out)
        else:
            if previous is not None and "files" not in previous and not (out / LEDGER_NAME).exists():
                note_written(out, legacy_files(out))  # a campaign from before the ledger: its own files
            remove_stale_temps(out)  # what atomic writes killed halfway left (names in the ledger only)
        note_written(out, [RESULTS, MANIFEST])
        done = {record_key(r) for r in read_records(results_path, repair=True)}
        info = _manifest(campaign)
        from .scenario import NOT_HASHED

        info.update(data=data, unhashed_keys=list(NOT_HASHED))
        runs = (previous or {}).get("runs", [])
        runs.append({"started": _now(), "resumed_with": len(done), "argv": sys.argv,
                     **({"data_path": scenario.data.path} if scenario.data.path else {})})  # where the data was
        info.update(started=(previous or {}).get("started", runs[-1]["started"]), runs=runs, status="running")
        atomic_write_text(manifest_path, json.dumps(info, indent=2))

        units = campaign.units()
        expected = {k for u in units for k in campaign.unit_keys(u)}
        pending = [u for u in units if not set(campaign.unit_keys(u)) <= done]
        if log is not None:
            log(f"{scenario.name}: {len(units)} units, {len(expected)} records ({len(done & expected)} already done) "
                f"-> {results_path}")
        writer = ResultsWriter(results_path)
        written = 0
        try:
            with Progress(scenario.name, len(expected), len(done & expected), quiet=quiet) as bar:
                for record in executor.run(campaign, pending, done):
                    writer.write(record)
                    written += 1
                    bar.update(1)
        finally:
            writer.close()
            runs[-1].update(finished=_now(), records_written=written)
            total = len(done & expected) + written
            info.update(runs=runs, records=total, status="complete" if total >= len(expected) else "interrupted",
                        files=read_ledger(out))
            atomic_write_text(manifest_path, json.dumps(info, indent=2))
        if report:
            from .report import write_report

            write_report(out, locked=True)
    return out


def rebuild_manifest(scenario: Scenario, *, output: str | Path | None = None, adapter=None, log=None) -> Path:
    """Write a fresh manifest.json for a folder whose manifest is missing or corrupt, from the scenario and the
    records there; refuses when a record does not belong to the scenario. Then ``--resume`` continues it."""
    out = Path(output or scenario.output)
    for name in (*OWN, "report"):
        refuse_symlink(out / name)
    if not (out / RESULTS).is_file():
        raise UserInputError(f"{out} holds no {RESULTS}; accepted: a campaign folder whose manifest is missing or "
                             "corrupt")
    campaign = make_campaign(scenario, adapter, output=out)
    with FolderLock(out, log):
        records = read_records(out / RESULTS, repair=True)
        expected = {k for u in campaign.units() for k in campaign.unit_keys(u)}
        stray = [record_key(r) for r in records if record_key(r) not in expected]
        if stray:
            raise UserInputError(f"{out / RESULTS} holds records this scenario does not produce (e.g. "
                                 f"{dict(zip(KEY_FIELDS, stray[0]))}); accepted: the scenario and overrides the "
                                 "campaign ran with")
        from .scenario import NOT_HASHED

        info = _manifest(campaign)
        info.update(data=campaign.task.fingerprint(), unhashed_keys=list(NOT_HASHED), started=_now(),
                    runs=[{"rebuilt": _now(), "records": len(records), "argv": sys.argv}], records=len(records),
                    status="complete" if len(records) >= len(expected) else "interrupted")
        note_written(out, [RESULTS, MANIFEST])
        info["files"] = read_ledger(out)
        atomic_write_text(out / MANIFEST, json.dumps(info, indent=2))
    return out
