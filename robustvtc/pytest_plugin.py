"""pytest plugin: a deployment's robustness requirements as tests, gated in CI next to its other tests.

    import pytest
    from robustvtc.pytest_plugin import assert_robust

    @pytest.mark.robustvtc(compressor="visionzip", budget=16)
    def test_visionzip_16_resists_cage(robustvtc_target):
        assert_robust(robustvtc_target, attack="cage", eps="4/255", min_accuracy=0.6)

Every check decides on a confidence interval, never on a point estimate: it passes when the whole interval
meets the requirement, fails when the whole interval breaches it, and is INCONCLUSIVE otherwise -- a failure
by default, worded as such and naming about how many samples would decide it (``--robustvtc-inconclusive
pass|skip`` or the ini option ``robustvtc_inconclusive`` change that; ``--robustvtc-confidence`` sets the level).

Every check runs a small campaign through :mod:`robustvtc.campaign`: the same records as ``robustvtc run``, so
a failure names a scenario file whose ``robustvtc run`` reproduces its figures, and ``--robustvtc-report DIR``
writes the CLI's report from the records the checks produced. Work is shared: in a session each
configuration (target x data x samples x steps) computes every clean and attack x eps unit once, whichever
checks ask for it.

Registered as the ``pytest11`` entry point ``robustvtc`` (disable with ``-p no:robustvtc``).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import pytest

from .errors import UserInputError

if TYPE_CHECKING:  # the plugin loads with every pytest run: torch and the campaign import only when used
    import pandas as pd
    import torch

    from .campaign.scenario import DataSpec
    from .target import Target

DEFAULT_SAMPLES = 32
DEFAULT_STEPS = 10
MARKER = "robustvtc"
FIXTURES = ("robustvtc_target", "make_target", "robustvtc_eval_set", "make_eval_set")
TARGET_OPTIONS = ("model", "compressor", "budget", "defense", "scenario", "device", "dtype", "model_kwargs", "seed")
# scenario keys a target takes from a scenario file (data and samples become its evaluation set)
SCENARIO_TARGET_KEYS = ("model", "model_kwargs", "device", "dtype", "seed", "batch_size", "eot_samples", "adaptive")
INCONCLUSIVE_ACTIONS = ("fail", "pass", "skip")


# ---------------------------------------------------------------------------------------------- options and hooks
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("robustvtc", "robustvtc security checks")
    group.addoption("--robustvtc-samples", type=_positive_int, default=None, metavar="N",
                    help="Evaluate every robustvtc check on N samples (overrides what the tests say).")
    group.addoption("--robustvtc-device", default=None, metavar="DEVICE",
                    help="Load every robustvtc model on DEVICE (cpu, cuda, cuda:1), overriding the tests.")
    group.addoption("--robustvtc-model", default=None, metavar="NAME",
                    help="Run every robustvtc check on this model ('builtin', a Hugging Face directory or hub id) "
                         "instead of the one the tests name, e.g. a candidate checkpoint.")
    group.addoption("--robustvtc-report", default=None, metavar="DIR",
                    help="Write the campaign report (as `robustvtc run` does) of the records the checks produced, "
                         "one folder per configuration under DIR, plus every check's scenario file.")
    group.addoption("--robustvtc-confidence", type=_level, default=None, metavar="LEVEL",
                    help="Confidence level of every check's interval (default 0.95; ini: robustvtc_confidence).")
    group.addoption("--robustvtc-inconclusive", choices=INCONCLUSIVE_ACTIONS, default=None,
                    help="What a check whose interval straddles its requirement does: fail (default), pass or skip "
                         "(ini: robustvtc_inconclusive).")
    parser.addini("robustvtc_confidence", "confidence level of robustvtc checks (default 0.95)", default="0.95")
    parser.addini("robustvtc_inconclusive", "fail | pass | skip: what an INCONCLUSIVE robustvtc check does",
                  default="fail")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{MARKER}(**target): a robustvtc security check; keyword arguments configure the "
                   f"robustvtc_target fixture ({', '.join(TARGET_OPTIONS)}). Select with -m {MARKER}.")
    config.stash[_SESSION] = Session(config)


@pytest.hookimpl(tryfirst=True)  # before -m deselects, so unmarked tests using the fixtures are selected too
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if set(FIXTURES) & set(getattr(item, "fixturenames", ())) and item.get_closest_marker(MARKER) is None:
            item.add_marker(MARKER)


def pytest_runtest_setup(item: pytest.Item) -> None:
    item.config.stash[_SESSION].current = item.nodeid


def pytest_sessionfinish(session: pytest.Session) -> None:
    robustvtc = session.config.stash.get(_SESSION, None)
    if robustvtc is not None and robustvtc.report_dir is not None:
        robustvtc.write_reports()


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    session = config.stash.get(_SESSION, None)
    if session is None or not session.measurements:
        return
    tr = terminalreporter
    tr.write_sep("=", "robustvtc security checks")
    header = ("result", "check", "target", "attack", "eps", f"measured ({100 * session.confidence:g} % CI)",
              "required", "test")
    rows = [(m.outcome, m.check, m.target, m.attack, m.eps, m.figure.format(m.kind),
             m.requirement, m.test) for m in session.measurements]
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        line = "  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip()
        colour = {"FAIL": {"red": True}, "PASS": {"green": True}, "INCONCLUSIVE": {"yellow": True}}
        tr.write_line(line, **colour.get(row[0], {}))
    for path in session.reports:
        tr.write_line(f"robustvtc report: {path}")


def _level(value: str) -> float:
    import argparse

    from .stats import check_level

    try:
        level: Any = float(value)
    except ValueError:
        level = value  # check_level refuses it, naming what is accepted
    try:
        return check_level(level)
    except UserInputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(value: str) -> int:
    import argparse

    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer >= 1")
    return number


# ---------------------------------------------------------------------------------------------- session state
_SESSION = pytest.StashKey["Session"]()


class Session:
    """One pytest run: loaded models, the campaign records of every configuration, the figures measured."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.samples: int | None = config.getoption("robustvtc_samples")
        self.device: str | None = config.getoption("robustvtc_device")
        self.model: str | None = config.getoption("robustvtc_model")
        report = config.getoption("robustvtc_report")
        self.report_dir = Path(report).resolve() if report else None
        self.confidence: float = config.getoption("robustvtc_confidence") or _ini_level(config)
        self.inconclusive: str = config.getoption("robustvtc_inconclusive") or _ini_choice(config)
        self.current = ""  # node id of the running test
        self.measurements: list[Measurement] = []
        self.reports: list[Path] = []
        self._adapters: dict[str, Any] = {}
        self._runs: dict[str, _Runs] = {}

    def adapter(self, model: str, device: str, dtype: str, model_kwargs: dict):
        """The model, loaded once per session for each (name, device, dtype, options)."""
        from .models import load_model

        key = json.dumps([model, device, dtype, model_kwargs], sort_keys=True, default=str)
        if key not in self._adapters:
            self._adapters[key] = load_model(model, device=device, dtype=dtype, **model_kwargs)
        return self._adapters[key]

    @cached_property
    def scenario_dir(self) -> Path:
        """Where the checks' scenario files go: DIR/scenarios with a report, else pytest's cache folder."""
        if self.report_dir is not None:
            folder = self.report_dir / "scenarios"
        elif getattr(self.config, "cache", None) is not None:
            folder = Path(self.config.cache.mkdir("robustvtc")) / "scenarios"
        else:  # cacheprovider disabled (-p no:cacheprovider)
            folder = Path(tempfile.mkdtemp(prefix="robustvtc-"))
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def runs(self, base: dict, adapter, name: str) -> "_Runs":
        """The records store of one configuration (``base``: its scenario document without attacks)."""
        key = hashlib.sha256(json.dumps(base, sort_keys=True, default=str).encode()).hexdigest()[:8]
        if key not in self._runs:
            folder = None
            if self.report_dir is not None:
                folder = self.report_dir / f"{name}-{key}"
                shutil.rmtree(folder, ignore_errors=True)  # this folder is the plugin's: last run's files go
                folder.mkdir(parents=True)
            self._runs[key] = _Runs(base, adapter, folder, f"{name}-{key}")
        return self._runs[key]

    def write_reports(self) -> None:
        for runs in self._runs.values():
            if runs.records:
                self.reports.append(runs.write_report())


class _Runs:
    """The campaign records of one configuration; each work unit is computed once, whichever check asks."""

    def __init__(self, base: dict, adapter, folder: Path | None, name: str):
        self.base = base
        self.adapter = adapter
        self.folder = folder
        self.name = name
        self.records: list[dict] = []
        self._done: set = set()
        self._eps: dict[str, list[float]] = {}  # attack label -> radii the checks used, for the combined scenario
        self._entries: dict[str, dict] = {}  # attack label -> its scenario entry (name, label, options)

    def records_for(self, scenario) -> list[dict]:
        """The records of ``scenario``, running only the units not yet computed."""
        from .campaign import Campaign

        campaign = Campaign(scenario, self.adapter, output=self.folder)  # output: kept-token examples for the report
        units = campaign.units()
        for unit in units:
            if unit not in self._done:
                self.records.extend(list(campaign.run_unit(unit)))  # a unit's records all or none
                self._done.add(unit)
        from .campaign.scenario import SCHEDULE_KEYS

        for spec in scenario.attacks:
            self._entries.setdefault(spec.label, {"name": spec.name, "label": spec.label, **{
                k: v for k, v in spec.options.items() if k not in SCHEDULE_KEYS}})
            known = self._eps.setdefault(spec.label, [])
            known += [e for e in spec.eps if e not in known]
        wanted = {(u.attack, u.eps) for u in units}
        return [r for r in self.records if (r["attack"], r["eps"]) in wanted]

    def write_report(self) -> Path:
        """results.jsonl + manifest.json + report/ in the configuration's folder, as ``robustvtc run`` writes.

        The runner writes the manifest: resuming the combined scenario over the records already here finds
        every unit done (records do not depend on which other attacks a scenario lists)."""
        import yaml

        from .campaign import parse_scenario, run_campaign
        from .campaign.records import MANIFEST, RESULTS

        doc = {"name": self.name, **self.base, "attacks": [{**self._entries[a], "eps": e} for a, e in self._eps.items()],
               "output": str(self.folder)}
        scenario = parse_scenario(doc, source=self.name)
        (self.folder / "scenario.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
        (self.folder / RESULTS).write_text("".join(json.dumps(r) + "\n" for r in self.records))
        (self.folder / MANIFEST).write_text(json.dumps({"scenario_hash": scenario.hash()}))
        run_campaign(scenario, output=self.folder, resume=True, quiet=True, adapter=self.adapter, report=True)
        return self.folder / "report" / "report.html"  # written under the folder's lock


def _ini_level(config: pytest.Config) -> float:
    import argparse

    try:
        return _level(str(config.getini("robustvtc_confidence")))
    except argparse.ArgumentTypeError as exc:
        raise pytest.UsageError(f"ini option robustvtc_confidence: {exc}") from None


def _ini_choice(config: pytest.Config) -> str:
    value = str(config.getini("robustvtc_inconclusive")).strip()
    if value not in INCONCLUSIVE_ACTIONS:
        raise pytest.UsageError(f"ini option robustvtc_inconclusive: {value!r}; accepted: "
                                f"{', '.join(INCONCLUSIVE_ACTIONS)}")
    return value


def _session(config: pytest.Config) -> Session:
    return config.stash[_SESSION]


def _one_line(fn: Callable) -> Callable:
    """A :class:`UserInputError` -> a one-line test failure ``robustvtc: <problem>; accepted: ...``."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        __tracebackhide__ = True
        try:
            return fn(*args, **kwargs)
        except UserInputError as exc:
            problem = str(exc)
        pytest.fail(f"robustvtc: {problem}", pytrace=False)  # outside the except: no chained traceback
    return wrapper


# ---------------------------------------------------------------------------------------------- targets and data
@dataclass(frozen=True)
class EvalSet:
    """What checks evaluate on: a scenario ``data`` source and how many of its items (the first N)."""

    spec: DataSpec
    samples: int

    def describe(self) -> str:
        s = self.spec
        return f"synthetic {s.split} split" if s.source == "synthetic" else f"{s.source} {s.path}"

    def document(self) -> dict:
        """The scenario ``data`` mapping (only the keys its source accepts)."""
        s = self.spec
        if s.source == "synthetic":
            return {"source": s.source, "split": s.split}
        doc = {"source": s.source, "path": s.path, "max_new_tokens": s.max_new_tokens}
        if s.image_root is not None:
            doc["image_root"] = s.image_root
        if s.source == "vqa_folder":
            doc["csv_name"] = s.csv_name
        return doc

    def batch(self, adapter) -> tuple[torch.Tensor, list[str], list[str]]:
        """(pixels, prompts, reference answers) of the items, for hand-written checks with ``get_attack``."""
        from .campaign.tasks import Task

        task = Task(self.spec, self.samples)
        return task.pixels(task.items, adapter), [i.prompt for i in task.items], [i.answer for i in task.items]


@dataclass
class DeploymentTarget:
    """A :class:`~robustvtc.target.Target` (``.target``) with the scenario keys that rebuild it, so a check
    can run it as a campaign and name the command that reproduces its figures."""

    target: Target
    document: dict  # model, device, dtype, compressors, budgets, defenses, seed, ... (no data, attacks)
    eval_set: EvalSet  # the default evaluation set of checks on this target
    defense: str  # the defense configuration's label in records ("none" without one)
    session: Session

    @property
    def cell(self) -> tuple[str, int]:
        return self.target.compressor.name, self.target.budget

    def describe(self) -> str:
        compressor, budget = self.cell
        shown = f"{self.document['model']} {compressor}@{budget}"
        return shown + (f" +{self.defense}" if self.defense != "none" else "")

    def __repr__(self) -> str:
        return f"DeploymentTarget({self.describe()})"


def _parse(doc: dict, source: str, base_dir: Path | None = None):
    """Validate a (partial) scenario document through the campaign's own checks."""
    from .campaign import parse_scenario

    full = {"compressors": ["none"], "budgets": ["all"], "attacks": ["fulltoken"], **doc}
    return parse_scenario(full, source=source, base_dir=base_dir)


def build_eval_set(source: str = "synthetic", *, split: str | None = None, path: str | None = None,
                   image_root: str | None = None, csv_name: str | None = None, max_new_tokens: int | None = None,
                   samples: int | None = None, base_dir: Path | None = None) -> EvalSet:
    """An evaluation set: the built-in task's split, or a data file (formats in docs/data.md; relative paths
    resolve against ``base_dir``)."""
    given = {"source": source, "split": split, "path": path, "image_root": image_root, "csv_name": csv_name,
             "max_new_tokens": max_new_tokens}
    data = {k: v for k, v in given.items() if v is not None}
    spec = _parse({"data": data, "samples": samples or DEFAULT_SAMPLES}, "make_eval_set", base_dir)
    return EvalSet(spec.data, spec.samples)


def _build_target(session: Session, model: str | None = None, compressor: str | None = None,
                 budget: int | str | None = None, defense: str | dict | None = None, *,
                 scenario: str | os.PathLike | None = None, device: str | None = None, dtype: str | None = None,
                 model_kwargs: dict | None = None, seed: int | None = None,
                 base_dir: Path | None = None) -> DeploymentTarget:
    """A target from keywords, or from a scenario file's model, data, compressor, budget and defense (the
    keywords override the file; ``--robustvtc-model`` / ``--robustvtc-device`` override both)."""
    from .compression import COMPRESSORS
    from .campaign.grid import make_target

    if compressor is not None:
        COMPRESSORS.get(compressor)  # "unknown compressor ...; accepted: ..." in the user's terms
    doc: dict[str, Any] = {"model": "builtin", "compressors": ["none"], "budgets": ["all"]}
    eval_set = build_eval_set(samples=session.samples)
    source = "make_target"
    if scenario is not None:
        path = Path(scenario)
        if base_dir is not None and not path.is_absolute() and (base_dir / path).is_file():
            path = base_dir / path
        doc, eval_set = _from_scenario(path, session)
        source = str(path)
    given = {"model": session.model or model, "device": session.device or device, "dtype": dtype,
             "model_kwargs": model_kwargs, "seed": seed}
    doc.update({k: v for k, v in given.items() if v is not None})
    if compressor is not None:
        doc["compressors"] = [compressor]
    if budget is not None:
        doc["budgets"] = [budget]
    if defense is not None:
        doc["defenses"] = [defense]
    spec = _parse(doc, source)
    compressors = [c for c in spec.compressors if c != "none"] or ["none"]
    # the full-token model keeps every token, whatever budgets a scenario lists for its compressed cells
    budgets = ["all"] if compressors == ["none"] and budget is None else list(spec.budgets)
    for what, values in (("compressor", compressors), ("budget", budgets)):
        if len(values) != 1:
            raise UserInputError(f"{source} lists {len(values)} {what}s ({', '.join(map(str, values))}); accepted: "
                                 f"one, or pick it with make_target({what}=...)")
    if len(spec.defenses) > 1:
        raise UserInputError(f"{source} lists {len(spec.defenses)} defenses; accepted: at most one (a deployment "
                             "runs one defense configuration), or pick it with make_target(defense=...)")
    doc.update(compressors=compressors, budgets=budgets)
    doc.setdefault("device", spec.device)
    doc.setdefault("dtype", spec.dtype)
    adapter = session.adapter(spec.model, doc["device"], doc["dtype"], spec.model_kwargs)
    target = make_target(adapter, compressors[0], None if budgets[0] == "all" else budgets[0], spec.seed,
                         defenses=doc.get("defenses", ()), scenario=spec)
    label = spec.defenses[0].label if spec.defenses else "none"
    return DeploymentTarget(target, doc, eval_set, label, session)


def _from_scenario(path: Path, session: Session) -> tuple[dict, EvalSet]:
    """The target keys of a scenario file, and its data and samples as an evaluation set."""
    from .campaign import load_scenario

    s = load_scenario(path)
    doc = {k: getattr(s, k) for k in SCENARIO_TARGET_KEYS}
    compressors = [{"label": c, "name": s.compressor_specs[c]["name"], **s.compressor_specs[c]["options"]}
                   if c in s.compressor_specs else c for c in s.compressors]  # plug-ins keep their options
    doc.update(compressors=compressors, budgets=list(s.budgets),
               defenses=[{d.name: d.options} if d.options else d.name for d in s.defenses])
    return doc, EvalSet(s.data, session.samples or s.samples)


@pytest.fixture
def make_target(request: pytest.FixtureRequest) -> Callable[..., DeploymentTarget]:
    """Factory: ``make_target(model="builtin", compressor="visionzip", budget=16, defense=None)`` or
    ``make_target(scenario="deploy.yaml")`` (a path relative to the test file, the current folder, or a shipped
    scenario name). Models load once per session."""
    return _one_line(functools.partial(_build_target, _session(request.config), base_dir=request.path.parent))


@pytest.fixture
def robustvtc_target(request: pytest.FixtureRequest, make_target) -> DeploymentTarget:
    """The target the closest ``@pytest.mark.robustvtc(...)`` keywords describe (default: the full-token
    built-in model); module- and class-level markers merge, the closest wins."""
    options: dict[str, Any] = {}
    for marker in reversed(list(request.node.iter_markers(MARKER))):
        options.update(marker.kwargs)
        if marker.args:
            pytest.fail(f"robustvtc: marker arguments must be keywords, got {marker.args!r}; accepted: "
                        f"{', '.join(TARGET_OPTIONS)}", pytrace=False)
    unknown = sorted(set(options) - set(TARGET_OPTIONS))
    if unknown:
        pytest.fail(f"robustvtc: unknown marker option {', '.join(unknown)}; accepted: {', '.join(TARGET_OPTIONS)}",
                    pytrace=False)
    return make_target(**options)


@pytest.fixture
def make_eval_set(request: pytest.FixtureRequest) -> Callable[..., EvalSet]:
    """Factory: ``make_eval_set("vqa_jsonl", path="data/val.jsonl", samples=50)`` (paths relative to the test
    file; formats in docs/data.md). ``--robustvtc-samples`` overrides ``samples``."""
    session = _session(request.config)

    def factory(source: str = "synthetic", *, samples: int | None = None, **data: Any) -> EvalSet:
        return build_eval_set(source, samples=session.samples or samples, base_dir=request.path.parent, **data)
    return _one_line(factory)


@pytest.fixture
def robustvtc_eval_set(make_eval_set) -> EvalSet:
    """The built-in task's test split, ``--robustvtc-samples`` items (default 32)."""
    return make_eval_set()


# ---------------------------------------------------------------------------------------------- measuring
@dataclass(frozen=True)
class Figure:
    """A measured fraction (or difference of fractions) and its confidence interval: Clopper–Pearson for an
    accuracy, Newcombe's paired score interval for a difference on the same samples."""

    value: float
    low: float
    high: float
    level: float = 0.95

    def format(self, kind: str = "percent") -> str:
        ci = f"{100 * self.level:g} % CI"
        if kind == "points":
            return f"{100 * self.value:+.1f} points ({ci} {100 * self.low:+.1f} to {100 * self.high:+.1f})"
        return f"{100 * self.value:.1f} % ({ci} {100 * self.low:.1f}–{100 * self.high:.1f} %)"


@dataclass
class Measurement:
    """One check's outcome, as the failure message and the terminal summary show it."""

    test: str
    check: str
    target: str
    attack: str
    eps: str
    figure: Figure
    kind: str  # "percent" or "points"
    requirement: str
    outcome: str  # PASS, FAIL or INCONCLUSIVE
    context: list[str]
    command: str
    samples_needed: int | None = None

    @property
    def passed(self) -> bool:
        return self.outcome == "PASS"

    def message(self) -> str:
        shown = f"{self.check} {self.figure.format(self.kind)}"
        if self.outcome == "INCONCLUSIVE":
            more = ("no realistic sample size decides it at the observed value" if self.samples_needed is None
                    else f"about {self.samples_needed} samples would likely decide it (--robustvtc-samples)")
            head = (f"robustvtc INCONCLUSIVE: {shown} straddles the requirement {self.requirement}: the interval "
                    f"neither meets nor breaches it; {more}")
        else:
            head = f"{shown} breaches the requirement {self.requirement}: the whole interval is outside it"
        return "\n".join([head, *(f"  {line}" for line in [*self.context, f"reproduce: {self.command}"])])


def _accuracy(correct: pd.Series, level: float) -> tuple[Figure, tuple[int, int]]:
    """Accuracy with its Clopper–Pearson interval, and (correct, n) for sample-size projections."""
    from . import stats

    k, n = int((correct > 0.5).sum()), int(correct.notna().sum())
    return Figure(k / n if n else float("nan"), *stats.clopper_pearson(k, n, level), level), (k, n)


def _paired(first: pd.Series, second: pd.Series, level: float):
    """first - second on the samples both have, with Newcombe's paired interval, and the paired counts."""
    import pandas as pd

    from . import stats

    both = pd.concat([first, second], axis=1, join="inner").dropna()
    counts = stats.PairedCounts.of(both.iloc[:, 0], both.iloc[:, 1])
    return Figure(counts.difference, *stats.paired_difference_ci(counts, level), level), counts


@dataclass
class _Evaluation:
    """One check's campaign records and how to reproduce them."""

    target: DeploymentTarget
    records: pd.DataFrame  # campaign records
    eps: float
    eps_text: str
    command: str
    setting: str  # "cage at eps 4/255, 10 steps, 32 samples of the synthetic test split"

    def correct(self, attack: str, cell: tuple[str, int] | None = None) -> pd.Series:
        """Per-sample correctness on ``cell`` (default: the target's) under the target's defense; the worst
        case of non-adaptive and adaptive crafting where the defense has both."""
        df = self.records
        compressor, budget = cell or self.target.cell
        rows = df[(df["attack"] == attack) & (df["compressor"] == compressor) & (df["budget"] == budget)
                  & (df["defense"] == self.target.defense) & ((df["eps"] == self.eps) | (attack == "clean"))]
        return rows.groupby("sample")["correct"].min()


def _evaluate(target: DeploymentTarget, attacks: Sequence[str], eps: str | float, steps: int,
              samples: int | None, data: EvalSet | None) -> _Evaluation:
    """Run the campaign of one check (only its units not yet computed this session)."""
    import yaml

    from .attacks import attack_class
    from .attacks.base import parse_eps
    from .campaign.formatting import format_eps
    from .campaign.metrics import frame

    _deployment(target)
    entries = [_attack_entry(a) for a in attacks]
    attacks = [label for label, _ in entries]
    for _, entry in entries:
        attack_class(entry["name"])  # UserInputError naming the accepted attacks
    radius = parse_eps(eps)
    if not 0 < radius <= 1:
        raise UserInputError(f"eps {eps!r} out of range; accepted: 0 < eps <= 1 (L-inf radius in [0, 1] pixel "
                             "space), e.g. '4/255'")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UserInputError(f"steps must be an integer >= 1, got {steps!r}")
    session = target.session
    data = data or target.eval_set
    n = session.samples or samples or data.samples
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserInputError(f"samples must be an integer >= 1, got {n!r}")
    compressor, budget = target.cell
    base = {**target.document, "data": data.document(), "samples": n, "steps": steps}
    runs = session.runs(base, target.target.adapter, f"{compressor}{budget}")
    eps_text = format_eps(radius)
    name = f"{compressor}{budget}-{'-'.join(attacks)}-{eps_text.replace('/', 'x')}"
    doc = {"name": _slug(name), **base, "attacks": [{**entry, "eps": [eps]} for _, entry in entries]}
    scenario = _parse(doc, f"check in {session.current}")
    name = f"{_slug(name)}-{scenario.hash()[:8]}"
    doc.update(name=name, output=f"runs/robustvtc/{name}")
    path = session.scenario_dir / f"{name}.yaml"
    path.write_text("# written by robustvtc's pytest plugin; reproduce with: robustvtc run <this file> --overwrite\n"
                    + yaml.safe_dump(doc, sort_keys=False))
    records = frame(runs.records_for(scenario))
    shown = os.path.relpath(path)
    command = f"robustvtc run {shlex.quote(path.as_posix() if shown.startswith('..') else shown)} --overwrite"
    setting = f"{' and '.join(attacks)} at eps {eps_text}, {steps} steps, {n} samples of the {data.describe()}"
    return _Evaluation(target, records, radius, eps_text, command, setting)


def _attack_entry(attack: str | Mapping) -> tuple[str, dict]:
    """(label, scenario entry) of a check's ``attack``: a name, or a mapping with ``name`` and options
    (``{"name": "whitebox", "target_answer": "no"}``, targeted), labelled ``whitebox(target_answer=no)``."""
    if isinstance(attack, str):
        return attack, {"name": attack}
    if not isinstance(attack, Mapping) or "name" not in attack:
        raise UserInputError(f"attack {attack!r} is not an attack; accepted: a name like 'cage' or a mapping "
                             "{'name': 'whitebox', 'target_answer': 'no', ...}")
    options = {k: v for k, v in attack.items() if k not in ("name", "label", "eps")}
    label = attack.get("label") or (attack["name"] + ("(" + ",".join(f"{k}={options[k]}" for k in sorted(options))
                                                      + ")" if options else ""))
    return label, {"name": attack["name"], "label": label, **options}


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-._" else "-" for ch in text)


def _conclude(run: _Evaluation, check: str, attack: str, figure: Figure, kind: str, bound: float,
              direction: str, requirement: str, context: list[str], samples_needed) -> Figure:
    """Decide on the interval, record the measurement, and fail the test on FAIL (and, unless configured
    otherwise, on INCONCLUSIVE) with the figures and the reproduce command."""
    __tracebackhide__ = True
    from . import stats

    target = run.target
    session = target.session
    compressor, budget = target.cell
    outcome = stats.decide(figure.low, figure.high, bound, direction)
    lines = [f"target: {target.document['model']}, {compressor} keeping {budget} of "
             f"{target.target.adapter.num_visual_tokens} visual tokens, defense {target.defense}",
             f"attack: {run.setting}", *context]
    needed = samples_needed(bound, direction) if outcome == stats.INCONCLUSIVE else None
    measurement = Measurement(session.current, check, target.describe(), attack, run.eps_text, figure, kind,
                              requirement, outcome, lines, run.command, needed)
    session.measurements.append(measurement)
    if outcome == stats.FAIL:
        raise AssertionError(measurement.message())
    if outcome == stats.INCONCLUSIVE:
        if session.inconclusive == "fail":
            raise AssertionError(measurement.message())
        if session.inconclusive == "skip":
            pytest.skip(measurement.message())
    return figure


def _deployment(target: Any) -> DeploymentTarget:
    if not isinstance(target, DeploymentTarget):
        raise UserInputError(f"target must come from the make_target or robustvtc_target fixture (it records how "
                             f"to rebuild the model for the reproduce command), got {type(target).__name__}")
    return target


def _fraction(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise UserInputError(f"{what} {value!r} out of range; accepted: a fraction in [0, 1] (0.6 = 60 %)")
    return float(value)


# ---------------------------------------------------------------------------------------------- assertions
@_one_line
def assert_robust(target: DeploymentTarget, *, eps: str | float, min_accuracy: float, attack: str | Mapping = "cage",
                  samples: int | None = None, steps: int = DEFAULT_STEPS, data: EvalSet | None = None) -> Figure:
    """Robust accuracy of the deployed target under ``attack`` at ``eps`` must be >= ``min_accuracy``.

    Decided on the exact (Clopper–Pearson) interval at the session's confidence level: passes when the whole
    interval is at or above the bound, fails when it is entirely below, and is INCONCLUSIVE otherwise.
    ``attack``: a name, or a mapping with options, e.g. ``{"name": "whitebox", "target_answer": "no"}``
    (targeted) or ``{"name": "torchattacks.APGD", "loss": "dlr"}``. Returns the measured figure."""
    __tracebackhide__ = True
    from . import stats

    bound = _fraction(min_accuracy, "min_accuracy")
    run = _evaluate(target, [attack], eps, steps, samples, data)
    attack = _attack_entry(attack)[0]
    level = target.session.confidence
    robust, (k, n) = _accuracy(run.correct(attack), level)
    clean, _ = _accuracy(run.correct("clean"), level)
    return _conclude(run, "robust accuracy", attack, robust, "percent", bound, "at_least",
                     f">= {100 * bound:.1f} %", [f"clean accuracy {clean.format()}"],
                     lambda b, d: stats.samples_to_decide_accuracy(k, n, b, d, level))


@_one_line
def assert_no_overestimation(target: DeploymentTarget, *, eps: str | float, max_gap: float = 0.05,
                             samples: int | None = None, steps: int = DEFAULT_STEPS,
                             data: EvalSet | None = None) -> Figure:
    """Robust accuracy under the full-token baseline (``fulltoken``) minus under the compression-aligned attack
    (``cage``), paired over samples, must be <= ``max_gap``: full-token testing must not overstate robustness.

    Decided on Newcombe's paired interval: passes when its upper end is <= ``max_gap``."""
    __tracebackhide__ = True
    from . import stats

    bound = _fraction(max_gap, "max_gap")
    run = _evaluate(target, ["fulltoken", "cage"], eps, steps, samples, data)
    level = target.session.confidence
    baseline, aligned = run.correct("fulltoken"), run.correct("cage")
    gap, counts = _paired(baseline, aligned, level)
    context = [f"robust accuracy under fulltoken {_accuracy(baseline, level)[0].format()}",
               f"robust accuracy under cage {_accuracy(aligned, level)[0].format()}",
               f"paired: {counts.first} samples only fulltoken leaves correct, {counts.second} only cage "
               f"(exact McNemar p = {stats.mcnemar_exact(counts):.3g})"]
    return _conclude(run, "overestimation gap", "fulltoken - cage", gap, "points", bound, "at_most",
                     f"<= {100 * bound:+.1f} points", context,
                     lambda b, d: stats.samples_to_decide_paired(counts, b, d, level))


@_one_line
def assert_compression_not_weaker(target: DeploymentTarget, *, eps: str | float, max_drop: float = 0.05,
                                  attack: str | Mapping = "cage", samples: int | None = None,
                                  steps: int = DEFAULT_STEPS,
                                  data: EvalSet | None = None) -> Figure:
    """Robust accuracy of the same model with all visual tokens minus with the target's compression, paired
    over samples, must be <= ``max_drop``: compressing must not make the model much easier to attack.

    Decided on Newcombe's paired interval: passes when its upper end is <= ``max_drop``."""
    __tracebackhide__ = True
    from . import stats

    bound = _fraction(max_drop, "max_drop")
    if _deployment(target).cell[0] == "none":
        raise UserInputError("the target keeps every visual token (compressor 'none'), so there is nothing to "
                             "compare; accepted: a target with a compressor and a budget")
    run = _evaluate(target, [attack], eps, steps, samples, data)
    attack = _attack_entry(attack)[0]
    level = target.session.confidence
    full = run.correct(attack, ("none", target.target.adapter.num_visual_tokens))
    compressed = run.correct(attack)
    drop, counts = _paired(full, compressed, level)
    context = [f"robust accuracy with all tokens {_accuracy(full, level)[0].format()}",
               f"robust accuracy compressed {_accuracy(compressed, level)[0].format()}"]
    return _conclude(run, "compression drop", attack, drop, "points", bound, "at_most",
                     f"<= {100 * bound:+.1f} points", context,
                     lambda b, d: stats.samples_to_decide_paired(counts, b, d, level))
