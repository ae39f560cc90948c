"""Scenario files: one YAML document describing a whole campaign, validated strictly before anything runs.

Every problem is one :class:`UserInputError` line naming the file, the key path (``attacks[1].eps``) and
what is accepted, so a typo never turns into a silently ignored option. Values given on the command line
are applied to the raw document *before* validation (black-style: the file sets defaults, flags win).

    name: quickstart                 # default: the file name
    mode: full                       # full: the whole LVLM answers questions; encoder: the encoder view only
                                     # (an encoder screening, see below and docs/encoder-screening.md)
    model: builtin                   # load_model name, a llava-hf directory or a hub id
    model_kwargs: {}                 # passed to load_model (image_size, attn_implementation, device_map, ...)
    device: cpu
    dtype: float32                   # float32 | bfloat16 | float16 (and fp32, bf16, fp16)
    threads: null                    # torch CPU threads; null = torch's default
    data: {source: synthetic, split: test}   # or {source: vqa_jsonl | vqa_folder | multiple_choice, path: ...}
                                     # or {source: hf, path: DIR_OR_FILES, preset: textvqa, split: validation}
                                     # or {source: images, path: DIR} (mode encoder: every image file, no questions)
    samples: 50                      # the first N items of the data
    compressors: [none, visionzip, fastervlm]   # "none" (all tokens) is always evaluated; an entry may also be
                                     # {name: ..., label: ..., <option>: ...} and a name may be a plug-in's
                                     # entry-point name or an import path module.path:ClassName
    budgets: [16, 32, 48]            # visual tokens reaching the LLM; "all" = every token
    eps: [8/255]                     # default radii for attacks that do not set their own
    schedule:                        # the PGD schedule every attack of the campaign shares (see below)
      steps: 10                      # iterations
      alpha: null                    # step size; null = eps/4 for each radius, or a radius like 0.5/255
      random_start: true             # uniform start in the ε-ball (seeded by seed:), false = start at δ = 0
    steps: 10                        # shorthand for schedule.steps (give one of the two)
    attacks:                         # a name, or a mapping with name, label, eps and any attack option;
                                     # [] = a clean-only campaign (accuracy per compressor x budget)
      - fulltoken
      - {name: cage, eps: [2/255, 8/255], lambda_efd: 1, lambda_rda: 200}
      - {name: cage, label: cage_official, eps: [2/255], steps: 100, alpha: 0.5/255, random_start: false}
    defenses: []                     # names or {name: {option: value}}; "none" is always evaluated
    adaptive: true                   # also craft against each defended target (EOT if it is randomised)
    eot_samples: 8
    seed: 0
    batch_size: 8
    output: runs/quickstart          # relative to the current directory
    save_images: false               # PNG of every adversarial image under output/images/
    examples: 2                      # samples whose kept-token maps the report shows
    fail_on_unreliable: false        # exit 1 when a gradient-masking check is violated (also --fail-on-unreliable)
    executor: {type: local}          # or {type: ray, address: auto, gpus_per_unit: 1, cpus_per_unit: 1, workers: 4}:
                                     # units as Ray actors across GPUs and nodes (docs/distributed.md)

Encoder-only campaigns (``mode: encoder``): the cheapest screening of a vision tower. ``model`` is a ``load_model``
name or an LVLM directory (its vision side is used) or a bare vision encoder (a CLIP / SigLIP / ViT / DeiT / DINOv2
directory or hub id, read with :func:`robustvtc.models.towers.load_encoder`; ``model_kwargs``: feature_layer,
image_mean, image_std); ``data`` is ``{source: images, path: DIR}`` (every image file in the folder, ids = file
names) or the synthetic split's images (its questions unused). Only grey-box attacks (threat model: encoder
gradients only) and compressors that plan from the encoder's tokens (pre-LLM, vision space, no text) are
accepted; no defenses. Records hold, per compressor x budget, the kept-token distortion, the kept-set overlap,
the rank correlation of the importance scores and the full-token distortion (:mod:`.encoder`).

Relative data paths resolve against the scenario file's folder, and so do a compressor's, attack's or
defense's file options (those its class lists in ``path_options``, e.g. a learned scorer's ``weights``).

Plug-ins: a compressor, attack or defense name may be an installed plug-in's entry-point name (groups
``robustvtc.compressors``, ``robustvtc.attacks``, ``robustvtc.defenses``) or an import path
``module.path:ClassName`` (imported from sys.path and the current directory); its options are checked against
the class's keyword arguments like a built-in's. See docs/plugins.md.

Fair comparisons: attacks compared in one campaign run one schedule. Each attack's steps, alpha and
random_start are resolved from ``schedule:`` (or its default) and stored explicitly in its options, so an
attack class's own defaults (CAGE's official 100 zero-start steps of 0.5/255, say) never make a gap by
themselves; an attack entry may still override any of the three (``attacks[i].steps`` etc.), and the
campaign manifest then names it under ``schedule_differences``. The default schedule is 10 steps, alpha =
eps/4 and a random start for every attack: a feature-distance loss such as fulltoken's has zero gradient
at δ = 0 (the clean point is its minimum), so a zero start would handicap it, while a random start costs
the other attacks nothing. With the same ``seed`` every attack draws the same start for the same images.
The resolved values are part of each attack's options and so of the hash that ``--resume`` compares.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import UserInputError

DATA_SOURCES = ("synthetic", "vqa_jsonl", "vqa_folder", "multiple_choice", "hf", "images")
MODES = ("full", "encoder")  # encoder: an encoder-only campaign (robustvtc.campaign.encoder)
TOP_KEYS = ("name", "description", "model", "model_kwargs", "device", "dtype", "threads", "data", "samples",
            "compressors", "budgets", "eps", "schedule", "steps", "attacks", "defenses", "adaptive", "eot_samples",
            "seed", "batch_size", "output", "save_images", "examples", "fail_on_unreliable", "executor", "mode")
REQUIRED = ("compressors", "budgets", "attacks")
DATA_KEYS = ("source", "split", "path", "preset", "image_root", "csv_name", "max_new_tokens")
ATTACK_KEYS = ("name", "label", "eps")
COMPRESSOR_KEYS = ("name", "label")
IMPORT_PATH = "module.path:ClassName"
SCHEDULE_KEYS = ("steps", "alpha", "random_start")
# the campaign schedule when the scenario says nothing (alpha None = eps/4 for each radius)
DEFAULT_SCHEDULE: dict[str, Any] = {"steps": 10, "alpha": None, "random_start": True}
# keys that do not change any record: they stay out of the hash that --resume compares ("schedule" acts only
# through each attack's resolved steps/alpha/random_start, which are hashed with the attack's options)
NOT_HASHED = ("name", "description", "output", "save_images", "examples", "threads", "schedule",
              "fail_on_unreliable", "executor")
EPS_FORMAT = "a float like 0.03 or a fraction like '8/255'"


@dataclass(frozen=True)
class DataSpec:
    source: str = "synthetic"
    split: str | None = "test"  # synthetic: the task's split; hf: the dataset's split (None = its only one)
    path: str | None = None
    preset: str | None = None  # hf: the benchmark preset (robustvtc.data.presets)
    image_root: str | None = None
    csv_name: str = "questions.csv"
    max_new_tokens: int = 8


@dataclass(frozen=True)
class AttackSpec:
    """One attack row of the campaign; ``label`` names it in records (defaults to the registry name)."""

    name: str
    label: str
    eps: tuple[float, ...]
    options: dict = field(default_factory=dict)  # every other attack option, the resolved schedule included

    def schedule(self) -> dict:
        """The resolved steps, alpha (None = eps/4) and random_start this attack runs with."""
        return {k: self.options[k] for k in SCHEDULE_KEYS}


@dataclass(frozen=True)
class DefenseSpec:
    name: str
    label: str
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ExecutorSpec:
    """Where the units run (not hashed: a campaign gives the same records on any executor, and resumes on
    another). ``local``: in this process. ``ray``: one Ray actor per worker holding the model, each granted
    ``cpus_per_unit`` CPUs and ``gpus_per_unit`` GPUs; ``address`` None starts a local cluster (or joins
    RAY_ADDRESS), ``auto`` joins the running one, ``ray://host:10001`` goes through Ray Client; ``workers``
    None = as many as the cluster's resources hold."""

    type: str = "local"
    address: str | None = None
    gpus_per_unit: float = 0
    cpus_per_unit: float = 1
    workers: int | None = None


EXECUTOR_TYPES = ("local", "ray")
EXECUTOR_KEYS = ("type", "address", "gpus_per_unit", "cpus_per_unit", "workers")


@dataclass(frozen=True)
class Scenario:
    name: str
    model: str
    compressors: tuple[str, ...]
    budgets: tuple[int | str, ...]
    attacks: tuple[AttackSpec, ...]
    description: str = ""
    model_kwargs: dict = field(default_factory=dict)
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    data: DataSpec = DataSpec()
    samples: int = 50
    schedule: dict = field(default_factory=lambda: dict(DEFAULT_SCHEDULE))  # the campaign-wide schedule
    defenses: tuple[DefenseSpec, ...] = ()
    adaptive: bool = True
    eot_samples: int = 8
    seed: int = 0
    batch_size: int = 8
    output: str = "runs/scenario"
    save_images: bool = False
    examples: int = 2
    fail_on_unreliable: bool = False  # a gate on the records, not a setting of them
    executor: ExecutorSpec = ExecutorSpec()  # where units run; not a setting of the records
    # compressor label -> {"name": registered name or module:Class, "options": {...}}, for every entry of
    # ``compressors`` that is not a plain registered name without options (empty for most scenarios)
    compressor_specs: dict = field(default_factory=dict)
    mode: str = "full"  # "encoder": an encoder-only campaign (robustvtc.campaign.encoder)

    def compressor_spec(self, label: str) -> tuple[str, dict]:
        """(registry name or import path, options) of the compressor labelled ``label``."""
        spec = self.compressor_specs.get(label)
        return (label, {}) if spec is None else (spec["name"], dict(spec["options"]))

    def to_dict(self) -> dict:
        """The resolved scenario as plain data (what the manifest stores and the hash covers)."""
        return json.loads(json.dumps(asdict(self)))

    def hash(self, paths: bool = False) -> str:
        """SHA-256 of everything that changes records; ``--resume`` refuses a scenario whose hash differs.
        Where the data lies (``data.path``, ``data.image_root``) is left out: its rows and images are compared
        by content instead (:meth:`~robustvtc.campaign.tasks.Task.fingerprint`), so a moved data folder resumes;
        the manifest still records the path. ``paths=True``: the hash with them (robustvtc before that)."""
        body = {k: v for k, v in self.to_dict().items() if k not in NOT_HASHED}
        if not body["compressor_specs"]:  # scenarios of registered names only keep their hash
            del body["compressor_specs"]
        if body.get("mode") == "full":  # scenarios from before encoder-only campaigns keep their hash
            del body["mode"]
        if not paths:
            body["data"] = {**body["data"], "path": None, "image_root": None}
        if body["data"].get("preset") is None:  # scenarios from before source hf keep their hash
            body["data"] = {k: v for k, v in body["data"].items() if k != "preset"}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------- loading
def shipped_scenarios() -> list[str]:
    """Names of the scenario files shipped in ``robustvtc.scenarios``."""
    return sorted(p.name[:-5] for p in resources.files("robustvtc.scenarios").iterdir() if p.name.endswith(".yaml"))


def resolve_path(name_or_path: str | Path) -> Path:
    """A scenario file path, or the shipped scenario of that name (``quickstart``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = resources.files("robustvtc.scenarios") / f"{name_or_path}.yaml"
    if shipped.is_file():
        return Path(str(shipped))
    raise UserInputError(f"scenario not found: {name_or_path}; accepted: a YAML file or a shipped scenario "
                         f"({', '.join(shipped_scenarios())})")


def load_scenario(name_or_path: str | Path, overrides: Mapping[str, Any] | None = None) -> Scenario:
    """Read, apply ``overrides`` (dotted key paths, e.g. ``{"samples": 10, "attacks.0.steps": 5}``), validate."""
    from ..safe_io import load_yaml

    path = resolve_path(name_or_path)
    raw = load_yaml(path)  # size limit, bounded aliases, duplicate keys refused, UTF-8 checked
    if raw is None:
        raw = {}
    raw = apply_overrides(raw, overrides or {}, str(path))
    return parse_scenario(raw, source=str(path), default_name=path.stem, base_dir=path.parent)


def apply_overrides(raw: Any, overrides: Mapping[str, Any], source: str = "scenario") -> Any:
    """A copy of ``raw`` with each dotted key set (list items by index); creates missing mappings."""
    raw = copy.deepcopy(raw)
    if not isinstance(raw, dict):
        return raw  # parse_scenario reports it
    for dotted, value in overrides.items():
        node: Any = raw
        parts = dotted.split(".")
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise UserInputError(f"{source}: override {dotted}: no item {part} in {'.'.join(parts[:i])} "
                                         f"(it has {len(node)})")
                key: Any = int(part)
                if not last and isinstance(node[key], str):  # "- cage" shorthand -> a mapping to set options on
                    node[key] = {"name": node[key]}
            elif isinstance(node, dict):
                key = part
                if not last:
                    node.setdefault(key, {})
            else:
                raise UserInputError(f"{source}: override {dotted}: {'.'.join(parts[:i])} is not a mapping or list")
            if last:
                node[key] = value
            else:
                node = node[key]
    return raw


# ------------------------------------------------------------------------------------------------- validation
class _Check:
    """Validation helpers that raise one line naming the source file and key path."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, path: str, problem: str, accepted: str) -> None:
        raise UserInputError(f"{self.source}: {path}: {problem}; accepted: {accepted}")

    def keys(self, value: Any, path: str, allowed: Sequence[str], required: Sequence[str] = ()) -> dict:
        if not isinstance(value, dict):
            self.fail(path or "top level", f"expected a mapping, got {_kind(value)}",
                      f"a mapping with keys {', '.join(allowed)}")
        for key in value:
            if key not in allowed:
                self.fail(_join(path, key), "unknown key", ", ".join(allowed))
        for key in required:
            if key not in value:
                self.fail(_join(path, key), "missing", f"a value for each of {', '.join(required)}")
        return value

    def integer(self, value: Any, path: str, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(path, f"{value!r} is not an integer >= {minimum}", f"an integer >= {minimum}")
        return value

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            self.fail(path, f"{value!r} is not a boolean", "true or false")
        return value

    def string(self, value: Any, path: str, accepted: str = "a non-empty string") -> str:
        if not isinstance(value, str) or not value.strip():
            self.fail(path, f"{value!r} is not a non-empty string", accepted)
        return value

    def choice(self, value: Any, path: str, accepted: Sequence[str]) -> str:
        if value not in accepted:
            self.fail(path, f"{value!r} is not accepted", ", ".join(accepted))
        return value

    def listing(self, value: Any, path: str, what: str) -> list:
        """A list (a scalar is a one-item list)."""
        items = value if isinstance(value, list) else [value]
        if not items or value is None:
            self.fail(path, "empty", f"one or more {what}")
        return items

    def eps(self, value: Any, path: str) -> float:
        from ..attacks.base import parse_eps

        try:
            return parse_eps(value)
        except UserInputError:
            self.fail(path, f"{value!r} is not a radius", EPS_FORMAT)


def parse_scenario(raw: Any, source: str = "scenario", default_name: str = "scenario",
                   base_dir: Path | None = None) -> Scenario:
    """Validate a scenario document (already loaded from YAML) into a :class:`Scenario`."""
    from ..attacks import ATTACKS
    from ..compression import COMPRESSORS
    from ..models.hf import DTYPES

    c = _Check(source)
    raw = c.keys(raw, "", TOP_KEYS, REQUIRED)
    name = c.string(raw.get("name", default_name), "name")
    if "/" in name or "\\" in name or ".." in name or name.startswith(".") or "\0" in name:
        c.fail("name", f"{name!r} holds a path separator, '..' or a leading '.'", "a plain name like my-scan "
               "(set output: to choose the folder)")
    out: dict[str, Any] = {"name": name, "output": f"runs/{name}"}
    for key in ("description", "model", "device", "output"):
        if key in raw:
            out[key] = c.string(raw[key], key) if key != "description" else str(raw[key])
    out.setdefault("model", "builtin")
    if "device" in raw:
        _device(c, out["device"])
    if "model_kwargs" in raw:
        if not isinstance(raw["model_kwargs"], dict):
            c.fail("model_kwargs", f"expected a mapping, got {_kind(raw['model_kwargs'])}",
                   "a mapping of load_model keyword arguments")
        out["model_kwargs"] = dict(raw["model_kwargs"])
        size = out["model_kwargs"].get("image_size")
        if size is not None and not (isinstance(size, int) and not isinstance(size, bool) and size >= 1 or (
                isinstance(size, list) and len(size) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size))):
            c.fail("model_kwargs.image_size", f"{size!r} is not an image size",
                   "a positive integer (pixels per side) or [height, width], at least the model's patch size")
    if "dtype" in raw:
        out["dtype"] = c.choice(raw["dtype"], "dtype", list(DTYPES))
    for key, minimum in (("samples", 1), ("eot_samples", 1), ("seed", 0), ("batch_size", 1), ("examples", 0),
                         ("threads", 1)):
        if key in raw and not (key == "threads" and raw[key] is None):
            out[key] = c.integer(raw[key], key, minimum)
    for key in ("adaptive", "save_images", "fail_on_unreliable"):
        if key in raw:
            out[key] = c.boolean(raw[key], key)
    out["data"] = _data(c, raw.get("data", {}), base_dir)
    if raw.get("executor") is not None:
        out["executor"] = _executor(c, raw["executor"], out.get("device", "cpu"))

    compressors, specs = [], {}
    for i, v in enumerate(c.listing(raw["compressors"], "compressors", "compressor names")):
        label, spec = _compressor(c, v, f"compressors[{i}]", COMPRESSORS, base_dir)
        if label in specs or (spec is not None and label in compressors):
            c.fail(f"compressors[{i}].label", f"duplicate {label!r}", "distinct labels (set label: to tell two apart)")
        compressors.append(label)
        if spec is not None:
            specs[label] = spec
    if "none" not in compressors:  # the full-token reference every record is compared with
        compressors.insert(0, "none")
    out["compressors"] = tuple(dict.fromkeys(compressors))
    out["compressor_specs"] = specs
    budgets = []
    for i, b in enumerate(c.listing(raw["budgets"], "budgets", "budgets")):
        if not (b == "all" or (isinstance(b, int) and not isinstance(b, bool) and b >= 1)):
            c.fail(f"budgets[{i}]", f"{b!r} is not a budget", "integers >= 1 (visual tokens kept) or 'all'")
        budgets.append(b)
    out["budgets"] = tuple(dict.fromkeys(budgets))

    default_eps = [c.eps(e, f"eps[{i}]") for i, e in enumerate(c.listing(raw.get("eps", "8/255"), "eps", "radii"))]
    out["schedule"] = schedule = _schedule(c, raw)
    attacks = [_attack(c, a, f"attacks[{i}]", ATTACKS, default_eps, schedule, base_dir)
               for i, a in enumerate([] if raw["attacks"] == [] else c.listing(raw["attacks"], "attacks", "attacks"))]
    _unique(c, [a.label for a in attacks], "attacks", "label", "attack labels (set label: to tell two apart)")
    out["attacks"] = tuple(attacks)
    defenses = [d for i, d in enumerate(c.listing(raw.get("defenses") or ["none"], "defenses", "defenses"))
                for d in [_defense(c, d, f"defenses[{i}]", base_dir)] if d is not None]
    _unique(c, [d.label for d in defenses], "defenses", "label", "distinct defense configurations")
    out["defenses"] = tuple(defenses)
    out["mode"] = c.choice(raw.get("mode", "full"), "mode", MODES)
    if out["mode"] == "encoder":
        from .encoder_scope import check_encoder_scenario

        check_encoder_scenario(c, out)
    elif out["data"].source == "images":
        c.fail("data.source", "images has no questions for the whole model to answer",
               "mode: encoder for an image folder (an encoder-only campaign), or a data source with questions")
    return Scenario(**out)


def _device(c: _Check, device: str) -> None:
    """A torch device string (cpu, cuda, cuda:1, mps, ...); availability is checked when the model loads."""
    import torch

    try:
        torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        c.fail("device", f"{device!r} is not a device", "cpu, cuda, cuda:N or mps")


def _option_types(c: _Check, cls, options: dict, path: str) -> None:
    """Options whose default is a number or a boolean must be one too (``lambda_rda: abc`` fails here)."""
    params = inspect.signature(cls.__init__).parameters
    for key, value in options.items():
        default = params[key].default if key in params else None
        if key in ("eps", "alpha") or default is None or default is inspect.Parameter.empty:
            continue
        if isinstance(default, bool):
            if not isinstance(value, bool):
                c.fail(f"{path}.{key}", f"{value!r} is not a boolean", "true or false")
        elif isinstance(default, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                c.fail(f"{path}.{key}", f"{value!r} is not a number",
                       "an integer" if isinstance(default, int) else "a number like 0.005")


def _data(c: _Check, raw: Any, base_dir: Path | None) -> DataSpec:
    from ..data.synthetic import SPLIT_SEEDS

    raw = c.keys(raw, "data", DATA_KEYS)
    source = c.choice(raw.get("source", "synthetic"), "data.source", DATA_SOURCES)
    spec: dict[str, Any] = {"source": source}
    if source == "images":  # a folder of image files, no questions (mode encoder)
        for key in ("split", "preset", "image_root", "csv_name", "max_new_tokens"):
            if key in raw:
                c.fail(f"data.{key}", "not for source images", "source, path (a folder of image files)")
        if "path" not in raw:
            c.fail("data.path", "missing", "the folder of image files of source images (ids = file names)")
        value = Path(c.string(raw["path"], "data.path")).expanduser()
        return DataSpec("images", None, str(value if value.is_absolute() or base_dir is None else base_dir / value))
    if source == "synthetic":
        for key in ("path", "preset", "image_root", "csv_name", "max_new_tokens"):
            if key in raw:
                c.fail(f"data.{key}", "only for file data", "source, split for the synthetic task")
        spec["split"] = c.choice(raw.get("split", "test"), "data.split", list(SPLIT_SEEDS))
        return DataSpec(**spec)
    if source == "hf":
        from ..data.presets import PRESETS

        if "preset" not in raw:
            c.fail("data.preset", "missing", f"one of {', '.join(PRESETS)} for source hf (see docs/data.md)")
        spec["preset"] = c.choice(raw["preset"], "data.preset", list(PRESETS))
        spec["split"] = c.string(raw["split"], "data.split", "a split name of the dataset, like validation") \
            if "split" in raw else None
    else:
        if "split" in raw:
            c.fail("data.split", "only for the synthetic task and source hf",
                   "source, path, image_root, csv_name, max_new_tokens")
        if "preset" in raw:
            c.fail("data.preset", "only for source hf", "source, path, image_root, csv_name, max_new_tokens")
    if "csv_name" in raw and source == "hf":
        c.fail("data.csv_name", "only for source vqa_folder", "source, path, preset, split, image_root, max_new_tokens")
    if "path" not in raw:
        c.fail("data.path", "missing", f"the data file or folder of source {source} (see docs/data.md)"
               + ("; a save_to_disk folder, parquet/arrow files or a glob for hf" if source == "hf" else ""))
    for key in ("path", "image_root"):
        if key in raw:
            value = Path(c.string(raw[key], f"data.{key}")).expanduser()
            spec[key] = str(value if value.is_absolute() or base_dir is None else base_dir / value)
    if "csv_name" in raw:
        if source != "vqa_folder":
            c.fail("data.csv_name", "only for source vqa_folder", "path, image_root")
        spec["csv_name"] = c.string(raw["csv_name"], "data.csv_name")
    if "max_new_tokens" in raw:
        spec["max_new_tokens"] = c.integer(raw["max_new_tokens"], "data.max_new_tokens", 1)
    return DataSpec(**spec)


def _schedule(c: _Check, raw: dict) -> dict:
    """The campaign schedule: ``schedule:`` over :data:`DEFAULT_SCHEDULE`, with ``steps:`` as its shorthand."""
    given = c.keys(raw.get("schedule", {}), "schedule", SCHEDULE_KEYS) if raw.get("schedule") is not None else {}
    if "steps" in raw and "steps" in given:
        c.fail("steps", "given twice (also as schedule.steps)", "one of steps (shorthand) or schedule.steps")
    merged = {**DEFAULT_SCHEDULE, **given, **({"steps": raw["steps"]} if "steps" in raw else {})}
    return _check_schedule(c, merged, "schedule", top_steps="steps" in raw)


def _check_schedule(c: _Check, values: dict, path: str, top_steps: bool = False) -> dict:
    """Validated steps (integer >= 0), alpha (None or a radius, parsed) and random_start (boolean)."""
    out = dict(values)
    out["steps"] = c.integer(values["steps"], "steps" if top_steps else f"{path}.steps", 0)
    if values["alpha"] is not None:
        out["alpha"] = c.eps(values["alpha"], f"{path}.alpha")
    out["random_start"] = c.boolean(values["random_start"], f"{path}.random_start")
    return out


def schedule_differences(schedules: Mapping[str, Mapping[str, Any]], shared: Mapping[str, Any] | None = None
                         ) -> list[str]:
    """Labels whose schedule (steps, alpha, random_start) differs from the others'.

    The reference is the schedule most attacks run; on a tie, the campaign's shared schedule if one of the
    tied groups runs it, else the first listed attack's. [] when all attacks share one schedule."""
    key = lambda s: tuple(json.dumps(s.get(k)) for k in SCHEDULE_KEYS)  # noqa: E731
    counts: dict[tuple, int] = {}
    for s in schedules.values():
        counts[key(s)] = counts.get(key(s), 0) + 1
    if len(counts) <= 1:
        return []
    top = max(counts.values())
    tied = [k for k, n in counts.items() if n == top]  # in first-listed order
    reference = key(shared) if shared is not None and key(shared) in tied else tied[0]
    return [label for label, s in schedules.items() if key(s) != reference]


def _plugin_class(c: _Check, name: Any, path: str, registry, extra: Sequence[str] = ()):
    """The class of a registered name, an entry-point plug-in or a ``module.path:ClassName`` reference."""
    from ..registry import is_import_path

    if not is_import_path(name):
        c.choice(name, path, [*extra, *registry.names(), IMPORT_PATH])
    try:
        return registry.get(name)
    except UserInputError as exc:
        raise UserInputError(f"{c.source}: {path}: {exc}") from None


def _class_options(c: _Check, cls, options: dict, path: str, reserved: Sequence[str],
                   base_dir: Path | None) -> dict:
    """``options`` checked against the keywords and types of ``cls``'s constructor (none where the class
    defines no ``__init__``); ``cls.path_options`` resolved against the scenario's folder."""
    params = inspect.signature(cls).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        allowed = [k for k, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        c.keys(options, path, [*reserved, *allowed])
    options = {k: v for k, v in options.items() if k not in reserved}
    _option_types(c, cls, options, path)
    return _resolve_paths(c, cls, options, path, base_dir)


def _resolve_paths(c: _Check, cls, options: dict, path: str, base_dir: Path | None) -> dict:
    """``options`` with the file options the class names in ``path_options`` resolved against ``base_dir``."""
    for key in getattr(cls, "path_options", ()):
        if key in options and options[key] is not None:
            value = Path(c.string(options[key], f"{path}.{key}", "a file path")).expanduser()
            options[key] = str(value if value.is_absolute() or base_dir is None else base_dir / value)
    return options


def _compressor(c: _Check, raw: Any, path: str, registry, base_dir: Path | None) -> tuple[str, dict | None]:
    """(label, spec or None for a plain registered name) of one ``compressors`` entry."""
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict) or "name" not in raw:
        c.fail(path, f"expected a compressor name or a mapping with 'name', got {_kind(raw)}",
               f"a registered name, {IMPORT_PATH}, or {{name: ..., label: ..., <option>: ...}}")
    name = c.string(raw["name"], f"{path}.name" if len(raw) > 1 else path)
    cls = _plugin_class(c, name, path if len(raw) == 1 else f"{path}.name", registry)
    options = _class_options(c, cls, raw, path, COMPRESSOR_KEYS, base_dir)
    label = c.string(raw.get("label", cls.name if ":" not in cls.name else name), f"{path}.label")
    if label != name and label in registry.names():
        c.fail(f"{path}.label", f"{label!r} is a registered compressor's name", "a label of its own")
    if label == name and not options:
        return label, None
    return label, {"name": name, "options": options}


def _attack(c: _Check, raw: Any, path: str, registry, default_eps: list[float], schedule: dict,
            base_dir: Path | None = None) -> AttackSpec:
    from ..attacks.base import COMMON_DEFAULTS

    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict) or "name" not in raw:
        c.fail(path, f"expected an attack name or a mapping with 'name', got {_kind(raw)}",
               f"one of {', '.join(registry.names())}, or {{name: ..., eps: ..., steps: ..., <option>: ...}}")
    name = raw["name"]
    if isinstance(name, str) and name.startswith("torchattacks."):
        return _torchattack(c, raw, path, default_eps, schedule)
    cls = _plugin_class(c, name, f"{path}.name", registry)
    options = [*cls._own_parameters(), *(k for k in COMMON_DEFAULTS if k != "eps")]
    if cls.threat.budget_known and not cls.threat.compressor_known:
        options.remove("budget")  # the campaign sets it to each budget of the grid
    c.keys(raw, path, [*ATTACK_KEYS, *options])
    label, eps, opts = _attack_fields(c, raw, path, cls, default_eps, schedule)
    return AttackSpec(name, label, eps, _resolve_paths(c, cls, opts, path, base_dir))


def _attack_fields(c: _Check, raw: dict, path: str, cls, default_eps: list[float],
                   schedule: dict) -> tuple[str, tuple[float, ...], dict]:
    """An attack entry's label, radii and options (the campaign schedule under the entry's overrides)."""
    label = c.string(raw.get("label", raw["name"]), f"{path}.label")
    if label == "clean":
        c.fail(f"{path}.label", "'clean' is reserved for the unattacked images", "any other label")
    eps = ([c.eps(e, f"{path}.eps[{i}]") for i, e in enumerate(c.listing(raw["eps"], f"{path}.eps", "radii"))]
           if "eps" in raw else default_eps)
    opts = {k: v for k, v in raw.items() if k not in ATTACK_KEYS}
    opts.update(_check_schedule(c, {**schedule, **{k: opts[k] for k in SCHEDULE_KEYS if k in opts}}, path))
    _option_types(c, cls, opts, path)
    return label, tuple(dict.fromkeys(eps)), opts


def _torchattack(c: _Check, raw: dict, path: str, default_eps: list[float], schedule: dict) -> AttackSpec:
    """``{name: torchattacks.<Class>, eps: ..., <keyword argument of the class>: ...}``: the class must exist and
    have a radius, its options are the keyword arguments of its signature (plus the common ones)."""
    from ..attacks.base import COMMON_DEFAULTS
    from ..attacks.torchattack import _torch_class, refusal, torch_options, torchattacks_names

    name = raw["name"]
    try:
        cls = _torch_class(name)
    except UserInputError:
        c.fail(f"{path}.name", f"{name!r} is not a torchattacks attack", ", ".join(torchattacks_names()))
    problem = refusal(name)
    if problem:
        raise UserInputError(f"{c.source}: {path}: {problem}")
    allowed = [*dict.fromkeys([*torch_options(name), *(k for k in COMMON_DEFAULTS if k != "eps")])]
    c.keys(raw, path, [*ATTACK_KEYS, *(k for k in allowed if k != "eps")])
    return AttackSpec(name, *_attack_fields(c, raw, path, cls, default_eps, schedule))


def _defense(c: _Check, raw: Any, path: str, base_dir: Path | None = None) -> DefenseSpec | None:
    """A defense entry (None for "none", which is always evaluated)."""
    if isinstance(raw, str):
        name, options = raw, {}
    elif isinstance(raw, dict) and len(raw) == 1:
        name, options = next(iter(raw.items()))
        options = {} if options is None else options
        if not isinstance(options, dict):
            c.fail(f"{path}.{name}", f"expected a mapping of options, got {_kind(options)}", "{option: value, ...}")
    else:
        c.fail(path, f"expected a defense name or a one-key mapping, got {_kind(raw)}", "jpeg or {jpeg: {quality: 75}}")
    if name == "none":
        return None
    registry = defense_registry()
    if registry is None:
        c.fail(path, f"no defenses are registered in this install, so {name!r} is unknown", "none")
    cls = _plugin_class(c, name, path, registry, extra=["none"])
    options = _class_options(c, cls, options, f"{path}.{name}", (), base_dir)
    label = name + ("(" + ",".join(f"{k}={options[k]}" for k in sorted(options)) + ")" if options else "")
    return DefenseSpec(name, label, dict(options))


def defense_registry():
    """The DEFENSES registry of ``robustvtc.defenses``, or None while no defense is installed."""
    from .. import defenses

    return getattr(defenses, "DEFENSES", None)


def _executor(c: _Check, raw: Any, device: str) -> ExecutorSpec:
    """``executor:``: a type name or a mapping; GPUs per unit default to 1 for a CUDA device, else 0."""
    if isinstance(raw, str):
        raw = {"type": raw}
    raw = c.keys(raw, "executor", EXECUTOR_KEYS)
    kind = c.choice(raw.get("type", "local"), "executor.type", EXECUTOR_TYPES)
    cuda = device.startswith("cuda")
    if kind == "local":
        for key in EXECUTOR_KEYS[1:]:
            if raw.get(key) is not None:
                c.fail(f"executor.{key}", "only for type ray", "type: local alone, or type: ray with "
                       + ", ".join(EXECUTOR_KEYS[1:]))
        return ExecutorSpec()
    spec: dict[str, Any] = {"type": kind}
    if raw.get("address") is not None:
        spec["address"] = c.string(raw["address"], "executor.address",
                                   "auto (the running cluster), ray://host:10001 (Ray Client) or host:6379")
    for key, default, minimum in (("gpus_per_unit", 1 if cuda else 0, 0), ("cpus_per_unit", 1, 0)):
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum or (
                key == "cpus_per_unit" and value <= 0):
            c.fail(f"executor.{key}", f"{value!r} is not a number {'>' if key == 'cpus_per_unit' else '>='} 0",
                   "a number of Ray resources such as 1, 2 or 0.5")
        spec[key] = value
    if raw.get("workers") is not None:
        spec["workers"] = c.integer(raw["workers"], "executor.workers", 1)
    if cuda and spec["gpus_per_unit"] == 0:
        c.fail("executor.gpus_per_unit", f"0 with device {device}: Ray would grant the workers no GPU",
               "a GPU share such as 1 or 0.5, or device: cpu")
    if not cuda and spec["gpus_per_unit"] > 0:
        c.fail("executor.gpus_per_unit", f"{spec['gpus_per_unit']} with device {device}: the workers would hold GPUs "
               "they never use", "0, or device: cuda (each worker then uses the GPU Ray grants it)")
    return ExecutorSpec(**spec)


def _unique(c: _Check, labels: list[str], path: str, what: str, accepted: str) -> None:
    seen = set()
    for i, label in enumerate(labels):
        if label in seen:
            c.fail(f"{path}[{i}].{what}", f"duplicate {label!r}", accepted)
        seen.add(label)


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _kind(value: Any) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"
