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

import hashlib
import inspect
import json
import os
import platform
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import AbstractSet, Iterator, Sequence

import numpy as np
import torch

from ..errors import UserInputError
from ..safe_io import (LEDGER_NAME, LOCK_NAME, FolderLock, atomic_write_text, atomic_write_with, is_own_temp,
                       read_ledger, refuse_symlink, remove_stale_temps)
from ..evaluate import CellResult, evaluate_grid, make_target, parse_budgets
from .scenario import Scenario, defense_registry
from .tasks import Item, Task

KEY_FIELDS = ("sample", "attack", "eps", "compressor", "budget", "defense", "adaptive")
CLEAN = "clean"
NONE = "none"
RESULTS, MANIFEST, EXAMPLES, IMAGES = "results.jsonl", "manifest.json", "examples", "images"

Cell = tuple[str, int]  # (compressor, budget)


def record_key(record: dict) -> tuple:
    return tuple(record[k] for k in KEY_FIELDS)


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

    def __init__(self, scenario: Scenario, adapter=None, output: str | Path | None = None):
        from ..attacks import ATTACKS
        from ..models import load_model

        self.scenario = scenario
        self.output = Path(output) if output is not None else None
        self.adapter = adapter if adapter is not None else load_model(
            scenario.model, device=scenario.device, dtype=scenario.dtype, **scenario.model_kwargs)
        self.task = Task(scenario.data, scenario.samples)
        items = self.task.items
        self.chunks = [items[i:i + scenario.batch_size] for i in range(0, len(items), scenario.batch_size)]
        n = self.adapter.num_visual_tokens
        try:
            self.budgets = list(dict.fromkeys(parse_budgets(scenario.budgets, n)))
        except UserInputError as exc:
            raise UserInputError(f"budgets: {exc}") from None
        self.cells: list[Cell] = [(NONE, n)] + [(c, b) for c in scenario.compressors if c != NONE for b in self.budgets]
        self.full = self.cells[0]
        self.mappings = {}
        for cell in self.cells:  # refuses compressors this model cannot run, before any work
            try:
                self.mappings[cell] = make_target(self.adapter, *cell).budget_mapping()
            except UserInputError as exc:
                raise UserInputError(f"compressors: {exc}") from None
        self._defense_specs = {d.label: d for d in scenario.defenses}
        self._thresholds: dict[tuple, float] = {}
        self.defenses = [NONE, *self._defense_specs]
        self.defense_cells = {d: self._applicable(d) for d in self.defenses}
        self.attacks = {a.label: a for a in scenario.attacks}
        self.threats = {a.label: ATTACKS.get(a.name).threat for a in scenario.attacks}
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
                make_target(self.adapter, *cell, defenses=self._defense_objects(defense, 0, cell, calibrated=False))
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
        from ..attacks import get_attack
        from ..defenses import adaptive_attack_options

        cell = craft.against or self.full
        target = make_target(self.adapter, *cell, seed=seed, defenses=self._defense_objects(against, seed, cell))
        opts = {**adaptive_attack_options(target, self.scenario.eot_samples), "seed": self.scenario.seed,
                **spec.options, "eps": eps}
        if craft.budget is not None:
            opts["budget"] = craft.budget
        return get_attack(spec.name, target, **opts)

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
            target = make_target(self.adapter, *cell, defenses=[detector])
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
        clean_px = self.task.pixels(items, self.adapter)
        if unit.attack == CLEAN:
            for d in self.defenses:
                clean = self._clean(unit.chunk, clean_px, items, d)
                yield from self._records(unit, items, d, False, self._cells(self.cells, d), clean, clean, clean_px,
                                         clean_px, 0.0, done)
            return
        spec = self.attacks[unit.attack]
        for craft, against, evals, _ in groups:
            seed = self._seed("craft", unit, craft, against)
            with _seeded(seed):
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

    def _clean(self, chunk: int, pixels: torch.Tensor, items: Sequence[Item], defense: str) -> dict[Cell, CellResult]:
        key = (chunk, defense)
        if key not in self._clean_cache:
            self._clean_cache = {k: v for k, v in self._clean_cache.items() if k[0] == chunk}
            seed = self._seed("clean", chunk, defense)
            self._clean_cache[key] = self._evaluate(self.defense_cells[defense], pixels, items, defense, seed)
        return self._clean_cache[key]

    def _evaluate(self, cells: Sequence[Cell], pixels: torch.Tensor, items: Sequence[Item], defense: str,
                  seed: int) -> dict[Cell, CellResult]:
        with _seeded(seed):
            targets = [make_target(self.adapter, *cell, seed=seed, defenses=self._defense_objects(defense, seed, cell))
                       for cell in cells]
            results = evaluate_grid(targets, pixels, lambda t, px, tok: self.task.predict(t, px, items, tok),
                                    keep_maps=True)
        return dict(zip(cells, results))

    def _records(self, unit: WorkUnit, items: Sequence[Item], defense: str, adaptive: bool, cells: Sequence[Cell],
                 adv: dict[Cell, CellResult], clean: dict[Cell, CellResult], adv_px: torch.Tensor,
                 clean_px: torch.Tensor, seconds: float, done: AbstractSet[tuple], attack=None) -> Iterator[dict]:
        delta = (adv_px - clean_px).flatten(1).float()
        linf, l2 = delta.abs().amax(dim=1).tolist(), delta.norm(dim=1).tolist()
        full, clean_full = adv[self.full], clean[self.full]
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
                yield {
                    "sample": item.id, "qtype": item.qtype, "question": item.question, "answer": item.answer,
                    "attack": unit.attack, "attack_threat": attack.threat.describe() if attack else None,
                    "eps": unit.eps, "steps": attack.steps if attack else 0,
                    "compressor": cell[0], "budget": cell[1], "defense": defense, "adaptive": adaptive,
                    "prediction": pred, "correct": self.task.correct(item, pred),
                    "clean_correct": self.task.correct(item, c.predictions[b]),
                    "full_token_correct": self.task.correct(item, full.predictions[b]),
                    "clean_full_token_correct": self.task.correct(item, clean_full.predictions[b]),
                    "flagged": a.flagged[b],
                    "kept_overlap": _at(overlap, b), "rank_spearman": _at(spearman, b),
                    "rank_kendall": _at(kendall, b), "kept_disruption": _at(disruption, b),
                    "linf": linf[b], "l2": l2[b], "seconds": seconds, "budget_mapping": self.mappings[cell],
                }

    # ------------------------------------------------------------------ side files
    def _save_images(self, unit: WorkUnit, items, craft: Craft, against: str, adv: torch.Tensor) -> None:
        folder = self.output / IMAGES
        folder.mkdir(parents=True, exist_ok=True)
        where = "all" if craft.against is None else f"{craft.against[0]}@{craft.against[1]}"
        where += f"-K{craft.budget}" if craft.budget is not None else ""
        names = [f"{_slug(item.id)}_{_slug(unit.attack)}_eps{unit.eps:.5f}_{where}_vs-{_slug(against)}.png"
                 for item in items]
        self._note([f"{IMAGES}/{n}" for n in names])
        for name, image in zip(names, adv):
            save_png(image, folder / name)

    def _save_examples(self, unit: WorkUnit, items, cells, clean, adv, clean_px, adv_px) -> None:
        """Kept-token maps of the first ``examples`` samples (clean vs adversarial), for the report."""
        first = unit.chunk * self.scenario.batch_size
        rows = [b for b in range(len(items)) if first + b < self.scenario.examples]
        if self.output is None or not rows:
            return
        folder = self.output / EXAMPLES
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for b in rows:
            item = items[b]
            stem = f"{_slug(item.id)}_{_slug(unit.attack)}_eps{unit.eps:.5f}"
            self._note([f"{EXAMPLES}/examples.jsonl", f"{EXAMPLES}/{_slug(item.id)}_clean.png", f"{EXAMPLES}/{stem}.png"])
            save_png(clean_px[b], folder / f"{_slug(item.id)}_clean.png")
            save_png(adv_px[b], folder / f"{stem}.png")
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
        path = folder / "examples.jsonl"
        refuse_symlink(path)
        if self._examples is None:
            self._examples = read_example_keys(path, repair=True)
        lines = [line for line in lines if example_key(line) not in self._examples]  # a unit run again (resume)
        if lines:
            with open(path, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(line) + "\n" for line in lines))
            self._examples.update(example_key(line) for line in lines)

    def _note(self, names: Sequence[str]) -> None:
        """Note files in the output folder's ledger before writing them (what --overwrite may remove)."""
        if self._noted is None:
            self._noted = set(_ledger(self.output))
        new = [n for n in names if n not in self._noted]
        if new:
            _note_written(self.output, new)
            self._noted.update(new)

    def _seed(self, *parts) -> int:
        """A seed derived from the scenario seed and what is being done (independent of execution order)."""
        text = json.dumps([self.scenario.seed, *map(str, parts)])
        return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Torch's global RNG set to ``seed`` inside, restored after (randomised defenses draw from it)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# ---------------------------------------------------------------------------------------------- per-sample measures
def kept_overlap(clean: torch.Tensor | None, adv: torch.Tensor | None) -> list[float] | None:
    """|kept_adv ∩ kept_clean| / K per sample, K = |kept_clean| (CAGE, arXiv 2601.21531: the share of the
    clean image's kept tokens the compressor still keeps on the adversarial one); None without a keep plan."""
    if clean is None or adv is None:
        return None
    inter = (clean & adv).sum(dim=1).float()
    return (inter / clean.sum(dim=1).float().clamp_min(1)).tolist()


def rank_correlations(clean, adv) -> tuple[list[float] | None, list[float] | None]:
    """Spearman and Kendall correlation of the clean and adversarial CLS-attention importance, per sample."""
    from scipy.stats import kendalltau, spearmanr

    from ..attacks.base import importance

    if clean.cls is None or adv.cls is None:
        return None, None
    x, y = importance(clean).cpu().numpy(), importance(adv).cpu().numpy()
    return ([float(spearmanr(a, b).statistic) for a, b in zip(x, y)],
            [float(kendalltau(a, b).statistic) for a, b in zip(x, y)])


def kept_disruption(clean, adv, kept: torch.Tensor | None) -> list[float] | None:
    """Mean 1 - cos(adversarial, clean) feature of the tokens the adversarial image's plan kept, per sample."""
    if kept is None:
        return None
    d = 1 - torch.nn.functional.cosine_similarity(adv.features.float(), clean.features.float(), dim=-1)
    k = kept.to(d.device).float()
    return ((d * k).sum(dim=1) / k.sum(dim=1).clamp_min(1)).tolist()


def _at(values: list | None, b: int):
    if values is None:
        return None
    value = values[b]
    return None if isinstance(value, float) and not np.isfinite(value) else value


def save_png(image: torch.Tensor, path: Path) -> None:
    """(3, H, W) in [0, 1] -> an 8-bit PNG (rounded: the PNG is a quantised copy of a float image)."""
    from PIL import Image

    array = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    atomic_write_with(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


EXAMPLE_KEY = ("sample", "attack", "eps", "compressor", "budget")


def example_key(entry: dict) -> tuple:
    return tuple(entry.get(k) for k in EXAMPLE_KEY)


def read_example_keys(path: Path, repair: bool = False) -> set[tuple]:
    """The keys of examples.jsonl's entries; a torn last line (killed mid-write) is skipped, or cut off the
    file with ``repair``, so entries appended after it stay one per line."""
    if not path.is_file():
        return set()
    raw = path.read_bytes()
    keys = set()
    lines = raw.split(b"\n")
    for line in lines[:-1]:  # complete lines (a line is complete once its newline is written)
        try:
            entry = json.loads(line) if line.strip() else None
            keys.add(example_key(entry))
        except (ValueError, UnicodeDecodeError, TypeError, AttributeError):
            continue  # not an entry: the report skips it too
    if repair and lines[-1]:
        with open(path, "r+b") as f:
            f.truncate(len(raw) - len(lines[-1]))
    return keys


def _slug(value) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "-" for ch in str(value))


# ---------------------------------------------------------------------------------------------- results files
class ResultsWriter:
    """Appends records to results.jsonl, one ``write`` + flush per record (a kill loses only the one in flight).
    Never through a symlink (O_NOFOLLOW)."""

    def __init__(self, path: Path):
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as exc:
            if Path(path).is_symlink():
                refuse_symlink(path)
            raise UserInputError(f"cannot write {path}: {exc.strerror}; accepted: a writable output folder") from None
        self.file = os.fdopen(fd, "a", encoding="utf-8")
        self._crash = _test_crash()

    def write(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        if self._crash is not None:
            self._crash.record(self.file, line)
        self.file.write(line)
        self.file.flush()

    def close(self) -> None:
        os.fsync(self.file.fileno())
        self.file.close()


class _TestCrash:
    """ROBUSTVTC_TEST_CRASH=after:N (SIGKILL once N records are written by this process) or mid:N (SIGKILL
    halfway through writing record N): the crash tests' way of killing a campaign at a chosen moment."""

    def __init__(self, mode: str, n: int):
        self.mode, self.n, self.count = mode, n, 0

    def record(self, file, line: str) -> None:
        import signal

        self.count += 1
        if self.mode == "mid" and self.count == self.n:
            file.write(line[:max(1, len(line) // 2)])
            file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        if self.mode == "after" and self.count == self.n + 1:
            os.kill(os.getpid(), signal.SIGKILL)


def _test_crash() -> _TestCrash | None:
    value = os.environ.get("ROBUSTVTC_TEST_CRASH", "")
    mode, _, n = value.partition(":")
    return _TestCrash(mode, int(n)) if mode in ("after", "mid") and n.isdigit() else None


# the fields every record has (a results.jsonl whose lines lack them is not robustvtc's)
REQUIRED_FIELDS = (*KEY_FIELDS, "correct", "clean_correct", "full_token_correct")


def read_records(path: str | Path, repair: bool = False) -> list[dict]:
    """Every complete record of a results.jsonl; a torn last line (killed mid-write) is ignored, or cut
    off the file with ``repair``. Later duplicates of a key (a resumed unit) replace earlier ones. A line that
    is not a robustvtc record (not JSON, not an object, lacking a key field) is one error naming it."""
    path = Path(path)
    if not path.is_file():
        return []
    raw = path.read_bytes()
    records: dict[tuple, dict] = {}
    good = 0
    lines = raw.split(b"\n")
    accepted = "a results.jsonl written by robustvtc run"
    for number, line in enumerate(lines, 1):
        if not line.strip():
            good += len(line) + 1
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if number < len(lines) - 1:
                raise UserInputError(f"{path} line {number} is not a JSON record; accepted: {accepted}") from None
            break  # torn last line
        if not isinstance(record, dict):
            raise UserInputError(f"{path} line {number} is a JSON {type(record).__name__}, not a record; "
                                 f"accepted: {accepted}")
        missing = [k for k in REQUIRED_FIELDS if k not in record]
        if missing:
            raise UserInputError(f"{path} line {number} lacks the field(s) {', '.join(missing)}; accepted: {accepted}")
        try:
            records[record_key(record)] = record
        except TypeError:
            raise UserInputError(f"{path} line {number}: a key field is a list or mapping; accepted: {accepted}") \
                from None
        good += len(line) + 1
    if repair and good < len(raw):
        with open(path, "r+b") as f:
            f.truncate(min(good, len(raw)))
    return list(records.values())


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
        attacks[spec.label] = {"name": spec.name, "eps": list(spec.eps), "threat": asdict(attack.threat),
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


OWN = (RESULTS, MANIFEST, LEDGER_NAME, LOCK_NAME)


def read_manifest(out: str | Path) -> dict | None:
    """The campaign's manifest.json, None when there is none; a corrupt one is one line naming the way out."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserInputError(
            f"{path} is not a valid manifest ({str(exc).splitlines()[0][:80]}; cut short by a crash?); accepted: "
            f"`robustvtc rebuild-manifest SCENARIO -o {Path(out)}` rebuilds it from the scenario and the records "
            "(then --resume), or --overwrite to start again") from None


def _changed_keys(old: dict, new: dict) -> list[str]:
    """Record-relevant scenario keys whose value differs between two resolved scenarios."""
    from .scenario import NOT_HASHED

    def where_free(scenario: dict) -> dict:  # where the data lies is not hashed (its contents are compared)
        data = scenario.get("data")
        return {**scenario, "data": {**data, "path": None, "image_root": None}} if isinstance(data, dict) else scenario
    old, new = where_free(old), where_free(new)
    keys = sorted((set(old) | set(new)) - set(NOT_HASHED))
    return [k for k in keys if json.dumps(old.get(k), sort_keys=True) != json.dumps(new.get(k), sort_keys=True)]


def _check_resume(out: Path, previous: dict, scenario: Scenario, data: dict | None) -> None:
    """Refuse to resume a campaign whose record-relevant keys or data contents changed, naming what changed."""
    from .scenario import NOT_HASHED

    unhashed = f"(keys that do not change records and may change: {', '.join(NOT_HASHED)})"
    if previous.get("scenario_hash") not in (scenario.hash(), scenario.hash(paths=True)):
        changed = _changed_keys(previous.get("scenario") or {}, scenario.to_dict()) if previous.get("scenario") else []
        what = f"changed: {', '.join(changed)}" if changed else f"scenario hash {previous.get('scenario_hash')}, now " \
                                                                 f"{scenario.hash()}"
        raise UserInputError(f"{out} holds a campaign of a different scenario ({what}) {unhashed}; accepted: the same "
                             "scenario and overrides, a new output folder, or --overwrite")
    old = previous.get("data")
    if data is None or not isinstance(old, dict):
        return  # a manifest without a data fingerprint (older robustvtc, the pytest plugin's)
    if old.get("rows") != data.get("rows"):
        raise UserInputError(f"{out}: the rows of {scenario.data.path} (ids, questions, answers) changed since the "
                             "campaign started; accepted: the data it started with, a new output folder, or --overwrite")
    files = data.get("image_files") or {}
    old_images, new_images = old.get("images") or {}, data.get("images") or {}
    if "image_files" not in old:  # robustvtc before images were keyed by sample: by path
        new_images = {files.get(sample, sample): digest for sample, digest in new_images.items()}
    for key in sorted(set(old_images) | set(new_images)):
        if old_images.get(key) != new_images.get(key):
            what = f"sample {key}'s image {files[key]}" if key in files else f"image {key}"
            raise UserInputError(f"{out}: {what} changed since the campaign started; accepted: the data it "
                                 "started with, a new output folder, or --overwrite")


def _check_folder(out: Path, scenario: Scenario, resume: bool, overwrite: bool, allow_existing: bool) -> dict | None:
    """Whether ``out`` may be written as asked (read-only); returns the previous manifest to continue, if any."""
    if out.exists() and not out.is_dir():
        raise UserInputError(f"output {out} is a file; accepted: a folder (new, empty, or holding a campaign)")
    for name in (*OWN, EXAMPLES, IMAGES, "report"):
        refuse_symlink(out / name)
    if not out.is_dir():
        return None
    manifest_file = out / MANIFEST
    if manifest_file.exists():
        try:
            previous = read_manifest(out)
        except UserInputError:
            if overwrite:
                return None  # what it wrote is in the ledger
            raise
        if resume:
            return previous
        if overwrite:
            return None
        raise UserInputError(f"{out} already holds a campaign; accepted: --resume to continue it, --overwrite "
                             "to start again, or another output folder")
    results = out / RESULTS
    ours = set(_ledger(out))
    if results.is_file() and results.stat().st_size > 0 and not (overwrite and RESULTS in ours):
        raise UserInputError(f"{out} holds {RESULTS} but no {MANIFEST}, so robustvtc cannot tell what wrote the "
                             f"records; accepted: `robustvtc rebuild-manifest SCENARIO -o {out}` (then --resume), "
                             "another output folder, or move the file away")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OWN and p.name not in ours
                     and not is_own_temp(out, p))
    if foreign and not allow_existing:
        raise UserInputError(f"{out} holds files that no robustvtc campaign wrote ({', '.join(foreign[:3])}"
                             f"{', ...' if len(foreign) > 3 else ''}); accepted: a new or empty folder, or "
                             "--allow-existing-files to write the campaign beside them")
    if foreign:
        clash = [n for n in (RESULTS, f"{EXAMPLES}/examples.jsonl", "report/report.html", "report/summary.md")
                 if (out / n).exists() and n not in ours]
        if clash:
            raise UserInputError(f"{out}: {clash[0]} exists and was not written by robustvtc; robustvtc would "
                                 "overwrite it; accepted: move it away or another output folder")
    return None


def _ledger(out: Path) -> list[str]:
    return read_ledger(out)


REPORT_FILES = ("report.html", "summary.md")


def report_root(results: str | Path, out: str | Path) -> Path:
    """The folder whose lock and ledger cover a report written to ``out``: the campaign folder ``results``
    when ``out`` lies in it (``results/report`` by default), else ``out`` itself (``robustvtc report -o``)."""
    results, out = Path(results), Path(out)
    a, b = os.path.normpath(results.absolute()), os.path.normpath(out.absolute())
    return results if b == a or b.startswith(a.rstrip(os.sep) + os.sep) else out


def check_report_folder(results: str | Path, out: str | Path, names=REPORT_FILES, prepare: bool = False) -> Path:
    """Refuse (one line naming it) to write a report through a symlink -- a folder between the campaign
    folder and the files, or a file -- or over a file of ``names`` (relative to ``out``) that robustvtc did
    not write (the ledger says; a pre-ledger campaign's fixed names count as its own). With ``prepare``
    (under the lock): create the folders and the ledger, and remove temporary files a kill left. Returns
    the folder the report's lock and ledger belong to (:func:`report_root`)."""
    results, out = Path(results), Path(out)
    root = report_root(results, out)
    inner = Path(os.path.relpath(os.path.normpath(out.absolute()), os.path.normpath(root.absolute())))
    folder = root
    for part in [p for p in inner.parts if p != "."]:
        folder = folder / part
        refuse_symlink(folder)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"report folder {out} is a file; accepted: a folder")
    ledger, legacy = set(read_ledger(root)), (root / MANIFEST).is_file() and not (root / LEDGER_NAME).exists()
    for name in names:
        path = out / name
        for parent in list(Path(name).parents)[:-1]:
            refuse_symlink(out / parent)
        refuse_symlink(path)
        rel = os.path.normpath(os.path.relpath(path.absolute(), root.absolute())).replace(os.sep, "/")
        if path.exists() and rel not in ledger and not (legacy and _LEGACY.match(rel)):
            raise UserInputError(f"{path} exists and was not written by robustvtc; the report would overwrite it; "
                                 "accepted: move it away, or another report folder (-o)")
    if prepare:
        for name in names:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
        refuse_symlink(root / LEDGER_NAME)
        if not (root / LEDGER_NAME).exists() and not (root / MANIFEST).is_file():
            (root / LEDGER_NAME).touch()  # a ledger, so the next report knows its own files
        remove_stale_temps(root, sorted({(inner / Path(n).parent).as_posix() for n in names}))
    return root


def run_campaign(scenario: Scenario, *, output: str | Path | None = None, resume: bool = False,
                 overwrite: bool = False, quiet: bool = False, adapter=None, executor=None,
                 log=None, allow_existing: bool = False, report: bool = False) -> Path:
    """Run (or resume) a campaign; returns its output folder holding results.jsonl and manifest.json
    (and ``report/`` with ``report``, written before the folder's lock is released: no other writer between).

    The folder is checked before the model loads and again under its lock (one writer per folder):
    an existing campaign needs ``resume`` (same record-relevant keys and data contents) or ``overwrite``
    (removes exactly the files campaigns wrote there); a folder holding other files needs ``allow_existing``.
    Every input (model, options, data rows, images) is validated before anything is written."""
    from tqdm import tqdm

    from .executor import LocalExecutor

    out = Path(output or scenario.output)
    manifest_path, results_path = out / MANIFEST, out / RESULTS
    _check_folder(out, scenario, resume, overwrite, allow_existing)  # fail fast, before loading the model
    if report:
        check_report_folder(out, out / "report")
    campaign = Campaign(scenario, adapter, output=out)
    data = campaign.task.fingerprint()
    with FolderLock(out, log):
        previous = _check_folder(out, scenario, resume, overwrite, allow_existing)
        if previous is not None:
            _check_resume(out, previous, scenario, data)
        if report:
            check_report_folder(out, out / "report")  # before anything is removed or written
        if overwrite:
            _clear(out)
        else:
            if previous is not None and "files" not in previous and not (out / LEDGER_NAME).exists():
                _note_written(out, _legacy_files(out))  # a campaign from before the ledger: its own files
            remove_stale_temps(out)  # what atomic writes killed halfway left (names in the ledger only)
        _note_written(out, [RESULTS, MANIFEST])
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
            with tqdm(total=len(expected), initial=len(done & expected), unit="rec", desc=scenario.name,
                      disable=True if quiet else None, file=sys.stderr, dynamic_ncols=True) as bar:
                for record in (executor or LocalExecutor()).run(campaign, pending, done):
                    writer.write(record)
                    written += 1
                    bar.update(1)
        finally:
            writer.close()
            runs[-1].update(finished=_now(), records_written=written)
            total = len(done & expected) + written
            info.update(runs=runs, records=total, status="complete" if total >= len(expected) else "interrupted",
                        files=_ledger(out))
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
    campaign = Campaign(scenario, adapter, output=out)
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
        _note_written(out, [RESULTS, MANIFEST])
        info["files"] = _ledger(out)
        atomic_write_text(out / MANIFEST, json.dumps(info, indent=2))
    return out


def _note_written(out: Path, names) -> None:
    """Add paths (relative to ``out``) to the folder's ledger of campaign files, before they are written."""
    known = set(_ledger(out))
    new = [str(n) for n in names if str(n) not in known]
    if new:
        refuse_symlink(out / LEDGER_NAME)
        with open(out / LEDGER_NAME, "a", encoding="utf-8") as f:
            f.write("".join(n + "\n" for n in new))
            f.flush()


# what campaigns of robustvtc before the ledger wrote (a manifest without "files", no ledger)
_LEGACY = re.compile(r"^(results\.jsonl|manifest\.json|examples/examples\.jsonl|examples/.+_(clean|eps[0-9.]+)\.png|"
                     r"images/.+_eps[0-9.]+_.+_vs-.+\.png|report/(report\.html|summary\.md|tables/[a-z_]+\.csv))$")


def _legacy_files(out: Path) -> list[str]:
    """The files in ``out`` a campaign of robustvtc before the ledger wrote (their fixed names and patterns)."""
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and not p.is_symlink()
                  and _LEGACY.match(p.relative_to(out).as_posix()))


def _clear(out: Path) -> None:
    """Remove exactly the files campaigns wrote in ``out`` (its ledger and manifest's list), nothing else;
    folders only when that leaves them empty."""
    remove_stale_temps(out)
    names = set(_ledger(out))
    try:
        manifest = read_manifest(out) or {}
    except UserInputError:
        manifest = {}
    names |= {n for n in manifest.get("files", []) if isinstance(n, str) and ".." not in Path(n).parts}
    if not names and manifest:  # a campaign from before the ledger: its fixed names and patterns
        names = set(_legacy_files(out))
    names.add(MANIFEST)
    for name in sorted(names, key=lambda n: -n.count("/")):
        path = out / name
        if path.is_symlink() or path.is_file():
            path.unlink()
    for folder in ("report/tables", "report", EXAMPLES, IMAGES):
        try:
            (out / folder).rmdir()
        except OSError:
            pass  # not empty (user files) or absent
    (out / LEDGER_NAME).unlink(missing_ok=True)
