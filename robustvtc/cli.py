"""Command line: ``robustvtc run | validate | report | compare | rebuild-manifest | list``
(also ``python -m robustvtc``).

Exit codes: 0 success (or a gate PASS), 1 gate FAIL, 2 usage error (bad input; one line, no traceback),
3 runtime error, 4 gate INCONCLUSIVE (the confidence interval straddles the requirement; ``--inconclusive
pass`` turns it into 0), 130 interrupted.

Scenario values are defaults; flags given on the command line override them (black-style). Messages go to
stderr through :mod:`logging` (``-q`` warnings only, ``-v`` debug and the third-party warnings that are
otherwise filtered); ``--json`` puts a machine-readable summary on stdout.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import shlex
import sys
import warnings
from functools import wraps

import click

from .errors import UserInputError

EXIT_GATE, EXIT_USAGE, EXIT_RUNTIME, EXIT_INCONCLUSIVE, EXIT_INTERRUPTED = 1, 2, 3, 4, 130
LOG = logging.getLogger("robustvtc")
# warnings users cannot act on (deprecations inside transformers and torch): shown with -v
THIRD_PARTY = ("transformers", "torch", "huggingface_hub", "tqdm", "matplotlib")


def handle_errors(fn):
    """User errors -> one line on stderr and exit 2; unexpected errors -> exit 3 (traceback only with
    ROBUSTVTC_DEBUG=1)."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserInputError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_USAGE)
        except (click.exceptions.Exit, click.ClickException, SystemExit, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
            if os.environ.get("ROBUSTVTC_DEBUG"):
                raise
            click.echo(f"runtime error: {type(exc).__name__}: {exc} (set ROBUSTVTC_DEBUG=1 for the traceback)", err=True)
            sys.exit(EXIT_RUNTIME)
    return wrapper


def setup_logging(verbose: int, quiet: bool) -> None:
    """robustvtc's messages on stderr: warnings only with ``quiet``, debug with ``verbose``; third-party
    warnings filtered unless ``verbose`` (then they are logged like ours)."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    LOG.handlers[:] = [handler]
    LOG.setLevel(level)
    LOG.propagate = False
    if verbose:
        logging.captureWarnings(True)
        logging.getLogger("py.warnings").handlers[:] = [handler]
    else:
        for module in THIRD_PARTY:
            warnings.filterwarnings("ignore", module=rf"{module}(\.|$)")


def verbosity(fn):
    """-v/--verbose (repeatable) and -q/--quiet on a command."""
    @click.option("-v", "--verbose", count=True, help="More messages: debug output and third-party warnings.")
    @click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only: no progress, no tables (CI).")
    @wraps(fn)
    def wrapper(*args, verbose: int = 0, quiet: bool = False, **kwargs):
        setup_logging(verbose, quiet)
        return fn(*args, quiet=quiet, **kwargs) if takes_quiet else fn(*args, **kwargs)
    takes_quiet = "quiet" in inspect.signature(fn).parameters
    return wrapper


JSON = click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary (JSON) on stdout.")


def _emit_json(data: dict) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="robustvtc")
def main() -> None:
    """Adversarial-robustness testing for vision-language models that compress their visual tokens."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ---------------------------------------------------------------------------------------------- options
def _overrides(options: dict, sets: tuple[str, ...]) -> dict:
    """Flags given on the command line (not None) and ``--set KEY=VALUE`` pairs, as dotted scenario keys."""
    import yaml

    out = {key: value for key, value in options.items() if value is not None}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserInputError(f"--set {item!r}: expected KEY=VALUE, e.g. --set attacks.0.steps=5")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserInputError(f"--set {item!r}: the value is not valid YAML") from None
    return out


def _gate(result, on_inconclusive: str) -> None:
    """Print a gate's outcome and exit: 0 PASS, 1 FAIL, 4 INCONCLUSIVE (0 with ``--inconclusive pass``)."""
    click.echo(f"gate {result.outcome} ({result.gate}): {result.message}", err=True)
    if result.outcome == "FAIL":
        sys.exit(EXIT_GATE)
    if result.outcome == "INCONCLUSIVE":
        if on_inconclusive == "pass":
            click.echo("gate: inconclusive accepted (--inconclusive pass)", err=True)
            return
        click.echo("gate: inconclusive fails the job (exit 4); add samples, or accept it with --inconclusive pass",
                   err=True)
        sys.exit(EXIT_INCONCLUSIVE)


CONFIDENCE = click.option("--confidence", type=click.FloatRange(0.5, 1, max_open=True), default=0.95,
                          show_default=True,
                          help="Confidence level of the gate's intervals (family-wise, Bonferroni over cells).")
INCONCLUSIVE = click.option("--inconclusive", "on_inconclusive", type=click.Choice(["fail", "pass"]), default="fail",
                            show_default=True, help="What an INCONCLUSIVE gate does: fail the job (exit 4) or pass it.")
FAIL_UNDER = click.option("--fail-under", type=click.FloatRange(0, 100), default=None, metavar="PCT",
                          help="Gate: every compressor x budget x defense x eps cell's worst-case robust accuracy "
                               "must be >= PCT with confidence: exit 1 when a cell's whole interval is below, 4 when "
                               "an interval straddles PCT (INCONCLUSIVE).")
FAIL_ON_UNRELIABLE = click.option(
    "--fail-on-unreliable/--no-fail-on-unreliable", default=None,
    help="Exit 1 when a gradient-masking sanity check is violated (results the report marks unreliable); "
         "default: the scenario's fail_on_unreliable.")
SET = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                   help="Override any scenario key (dotted path, YAML value), e.g. --set attacks.0.steps=5.")


def _gate_options(fn):
    return FAIL_UNDER(CONFIDENCE(INCONCLUSIVE(FAIL_ON_UNRELIABLE(fn))))


def _robustness_gate(df, fail_under, confidence):
    if fail_under is None:
        return None
    from .campaign.gates import robustness_gate

    return robustness_gate(df, fail_under / 100, confidence)


def _unreliable(df, enabled: bool) -> list[str]:
    if not enabled:
        return []
    from .campaign.masking import violations

    return violations(df)


def _conclude(gate, unreliable: list[str], on_inconclusive: str) -> None:
    """Gate, then ``--fail-on-unreliable``: exit 1 with one line naming the violated sanity checks."""
    if gate is not None:
        _gate(gate, on_inconclusive)
    if unreliable:
        click.echo(f"unreliable: {len(unreliable)} gradient-masking check(s) violated: {'; '.join(unreliable)}",
                   err=True)
        sys.exit(EXIT_GATE)


def _verdict(df, manifest: dict | None) -> dict:
    """:func:`~robustvtc.campaign.metrics.verdict` of the records, with the roles of their attacks."""
    from .campaign import metrics

    return metrics.verdict(df, metrics.attack_roles(list(df["attack"].unique()), manifest))


def _summary(df, manifest: dict | None, out, gate, unreliable: list[str], verdict: dict | None = None) -> dict:
    """The machine-readable summary of a campaign: records, verdict (``verdict``: when already computed), gate."""
    verdict = verdict if verdict is not None else _verdict(df, manifest)
    return {"folder": str(out), "records": len(df), "samples": int(df["sample"].nunique()),
            "status": (manifest or {}).get("status"),
            "verdict": {"sentence": verdict["sentence"], "level": verdict["level"], "cells": verdict["cells"],
                        "family_level": verdict.get("family_level"),
                        "table": verdict["table"].to_dict(orient="records")},
            "gate": None if gate is None else gate.as_dict(), "unreliable": unreliable}


def _resume_command() -> str:
    """The command that was run, with --resume (and without --overwrite): what continues it after Ctrl-C."""
    args = [a for a in sys.argv[1:] if a != "--overwrite"]
    return shlex.join(["robustvtc", *args, *([] if "--resume" in args else ["--resume"])])


# ---------------------------------------------------------------------------------------------- campaigns
@main.command()
@click.argument("scenario")
@click.option("--model", default=None, help="Override the scenario's model.")
@click.option("--samples", type=click.IntRange(min=1), default=None, help="Override the number of samples.")
@click.option("--seed", type=click.IntRange(min=0), default=None)
@click.option("--device", default=None, help="e.g. cpu, cuda, cuda:1.")
@click.option("--dtype", default=None, help="float32, bfloat16 or float16.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@click.option("--eot-samples", type=click.IntRange(min=1), default=None, help="EOT draws for randomised targets.")
@click.option("--save-images/--no-save-images", default=None, help="PNG of every adversarial image.")
@click.option("-o", "--output", default=None, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Override the scenario's torch CPU threads (1 is faster on a machine another job keeps busy).")
@click.option("--executor", type=click.Choice(["local", "ray"]), default=None,
              help="Where units run: in this process, or as Ray actors across GPUs and nodes (pip install "
              "\"robustvtc[ray]\"); only this process writes the output folder.")
@click.option("--address", default=None, metavar="ADDR", help="The Ray cluster: auto (the running one), "
              "ray://HEAD:10001, or none for a local cluster; implies --executor ray.")
@SET
@click.option("--resume", is_flag=True, help="Continue the campaign in the output folder (same scenario only).")
@click.option("--overwrite", is_flag=True, help="Delete the files campaigns wrote in the output folder (listed in "
              "its manifest; nothing else) and start again.")
@click.option("--allow-existing-files", is_flag=True,
              help="Write the campaign into a folder that already holds other files (they are left alone).")
@click.option("--dry-run", is_flag=True, help="Print the resolved scenario, the work and a time estimate from a "
              "short timing probe; write nothing.")
@click.option("--report/--no-report", default=True, show_default=True, help="Write the report when done.")
@_gate_options
@JSON
@verbosity
@handle_errors
def run(scenario, model, samples, seed, device, dtype, batch_size, eot_samples, save_images, output, threads, executor,
        address, sets, resume, overwrite, allow_existing_files, dry_run, report, fail_under, confidence, on_inconclusive,
        fail_on_unreliable, as_json, quiet):
    """Run a campaign: results.jsonl + manifest.json (+ report/) in the scenario's output folder.

    SCENARIO is a YAML file or the name of a shipped scenario (robustvtc list scenarios).

    \b
    Examples:
      robustvtc run quickstart
      robustvtc run my.yaml --samples 20 --device cuda --dtype bf16 -o runs/try1
      robustvtc run my.yaml --dry-run                # what would run, and about how long
      robustvtc run my.yaml --resume                 # after a crash or Ctrl-C
      robustvtc run my.yaml --executor ray --address auto   # units on a Ray cluster's GPUs
      robustvtc run my.yaml -q --fail-under 40       # CI gate: exit 1 below 40 %, 4 if undecided
    """
    if resume and overwrite:
        raise UserInputError("--resume and --overwrite contradict each other; accepted: one of them")
    from .campaign import load_scenario, run_campaign
    from .campaign.metrics import load_records
    from .campaign.records import read_manifest

    flags = {"model": model, "samples": samples, "seed": seed, "device": device, "dtype": dtype,
             "batch_size": batch_size, "eot_samples": eot_samples, "save_images": save_images, "output": output,
             "threads": threads, "executor.type": "ray" if address and not executor else executor,
             "executor.address": address}
    spec = load_scenario(scenario, _overrides(flags, sets))
    if spec.mode == "encoder" and fail_under is not None:
        raise UserInputError("--fail-under gates on robust accuracy, and an encoder-only campaign (mode: encoder) "
                             "asks no question; accepted: no --fail-under, or mode: full")
    if spec.threads:
        import torch

        torch.set_num_threads(spec.threads)
    if dry_run:
        from .campaign.plan import dry_run as plan

        info = plan(spec)
        if as_json:
            _emit_json(info)
        else:
            click.echo(info["text"])
        return
    try:
        out = run_campaign(spec, resume=resume, overwrite=overwrite, quiet=quiet, log=LOG.info,
                           allow_existing=allow_existing_files, report=report)  # the report under the lock
    except KeyboardInterrupt:
        click.echo(f"interrupted; continue with: {_resume_command()}", err=True)
        sys.exit(EXIT_INTERRUPTED)
    df = load_records(out)
    if report:
        LOG.info(f"report: {out / 'report' / 'report.html'}")
    if spec.mode == "encoder":
        _encoder_outcome(df, read_manifest(out), out, as_json, quiet)
        return
    gate = _robustness_gate(df, fail_under, confidence)
    unreliable = _unreliable(df, spec.fail_on_unreliable if fail_on_unreliable is None else fail_on_unreliable)
    if as_json:
        _emit_json(_summary(df, read_manifest(out), out, gate, unreliable))
    elif not quiet:
        _print_summary(df, read_manifest(out))
    _conclude(gate, unreliable, on_inconclusive)


def _encoder_outcome(df, manifest, out, as_json: bool, quiet: bool, tables: dict | None = None) -> None:
    """An encoder-only campaign's summary: its screening table and sentence (JSON on stdout with ``as_json``;
    else printed, unless ``quiet`` or views were printed)."""
    if not as_json and (quiet or tables is not None):
        return
    from .campaign import encoder_report, metrics

    table = metrics.screening(df, metrics.attack_roles(list(df["attack"].unique()), manifest))
    sentence = encoder_report.verdict_sentence(table)
    if as_json:
        data = {"folder": str(out), "records": len(df), "samples": int(df["sample"].nunique()),
                "status": (manifest or {}).get("status"), "mode": "encoder",
                "screening": {"sentence": sentence, "table": json.loads(table.to_json(orient="records"))}}
        if tables is not None:
            data["views"] = {name: json.loads(t.reset_index().to_json(orient="records")) for name, t in tables.items()}
        _emit_json(data)
    else:
        click.echo("Kept-token distortion (encoder screening); wins = share of images beating the baseline")
        click.echo(encoder_report.view(df, manifest, table).to_string(na_rep="–"))
        click.echo("\n" + sentence)


def _print_summary(df, manifest) -> None:
    from .campaign import views

    click.echo("Accuracy (%) without defense; columns compressor@budget")
    click.echo(views.attacks(df, manifest).to_string(na_rep="–"))
    if (df["attack"] != "clean").any():
        click.echo("\n" + _verdict(df, manifest)["sentence"])


@main.command()
@click.argument("scenarios", nargs=-1, required=True)
@SET
@verbosity
@handle_errors
def validate(scenarios, sets):
    """Check scenario files without running them: unknown keys, bad values, unknown plugins, and the budgets
    against the model's visual token count (read from its config, no weights loaded).

    \b
    Examples:
      robustvtc validate my.yaml
      robustvtc validate scenarios/*.yaml
    """
    from .campaign import load_scenario
    from .campaign.plan import check_against_model_config

    for name in scenarios:
        s = load_scenario(name, _overrides({}, sets))
        tokens = check_against_model_config(s)
        pairs = sum(len(a.eps) for a in s.attacks)
        model = f"{s.model} ({tokens} visual tokens)" if tokens else f"{s.model} (token count checked when it loads)"
        click.echo(f"{name}: ok -- {model}, {s.samples} samples, {len(s.compressors)} compressors x {len(s.budgets)} "
                   f"budgets, {len(s.attacks)} attacks ({pairs} attack x eps), defenses: "
                   f"{', '.join(['none', *(d.label for d in s.defenses)])}; output {s.output}")


@main.command("rebuild-manifest")
@click.argument("scenario")
@click.option("-o", "--output", default=None, type=click.Path(file_okay=False), help="The campaign folder.")
@SET
@verbosity
@handle_errors
def rebuild_manifest_cmd(scenario, output, sets):
    """Rebuild a missing or corrupt manifest.json from the scenario and the records in the folder.

    Give the same scenario and --set overrides the campaign ran with; records it does not produce are
    refused. Then continue with ``robustvtc run SCENARIO --resume``.

    \b
    Example:
      robustvtc rebuild-manifest my.yaml -o runs/my && robustvtc run my.yaml -o runs/my --resume
    """
    from .campaign import load_scenario
    from .campaign.runner import rebuild_manifest

    spec = load_scenario(scenario, _overrides({"output": output}, sets))
    if spec.threads:
        import torch

        torch.set_num_threads(spec.threads)
    out = rebuild_manifest(spec, log=LOG.info)
    click.echo(f"{out / 'manifest.json'} rebuilt; continue with: robustvtc run {scenario} -o {out} --resume")


@main.command("report")
@click.argument("results", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", default=None, type=click.Path(file_okay=False), help="Default: RESULTS/report.")
@click.option("--view", "view_names", multiple=True, metavar="NAME",
              help="Print a table instead of writing the report (repeatable): accuracy, by-type, attacks, verdict, "
                   "benchmark, difficulty, uniprunebench, encoder.")
@click.option("--bootstrap", default=1000, show_default=True, type=click.IntRange(min=1),
              help="Bootstrap resamples (continuous per-image measures: rank correlations).")
@click.option("--seed", default=0, show_default=True, help="Bootstrap seed.")
@_gate_options
@JSON
@verbosity
@handle_errors
def report_cmd(results, out, view_names, bootstrap, seed, fail_under, confidence, on_inconclusive, fail_on_unreliable,
               as_json):
    """Write report.html (self-contained), summary.md and tables/*.csv from a campaign's results, or print
    one of its views.

    \b
    Examples:
      robustvtc report runs/quickstart
      robustvtc report runs/clean_grid --view accuracy --view by-type
      robustvtc report runs/nightly --fail-under 40 --json   # gate on stored results, summary on stdout
    """
    from .campaign import views
    from .campaign.metrics import load_records
    from .campaign.records import read_manifest

    df = load_records(results)
    manifest = read_manifest(results)
    unknown = [v for v in view_names if v not in views.VIEWS]
    if unknown:
        raise UserInputError(f"unknown view {unknown[0]!r}; accepted: {', '.join(views.VIEWS)}")
    from .campaign.encoder_report import is_encoder_campaign

    if is_encoder_campaign(df, manifest):
        return _encoder_report(results, out, df, manifest, view_names, fail_under, as_json)
    paths, verdict = {}, None
    if view_names:
        tables = {name: views.VIEWS[name](df, manifest) for name in view_names}
        if not as_json:
            for name, table in tables.items():
                click.echo(f"{name}:\n{table.to_string(na_rep='–')}\n")
    else:
        from .campaign.report import write_report

        verdict = _verdict(df, manifest)  # once: for the report and the JSON summary
        paths = write_report(results, out, n_boot=bootstrap, seed=seed, df=df, manifest=manifest, verdict=verdict)
        LOG.info(f"{paths['html']}\n{paths['markdown']}")
    gate = _robustness_gate(df, fail_under, confidence)
    if fail_on_unreliable is None:
        fail_on_unreliable = bool(((manifest or {}).get("scenario") or {}).get("fail_on_unreliable"))
    unreliable = _unreliable(df, fail_on_unreliable)
    if as_json:
        data = _summary(df, manifest, results, gate, unreliable, verdict)
        data["report"] = {k: str(v) for k, v in paths.items()}
        if view_names:
            data["views"] = {name: json.loads(table.reset_index().to_json(orient="records"))
                             for name, table in tables.items()}
        _emit_json(data)
    _conclude(gate, unreliable, on_inconclusive)


def _encoder_report(results, out, df, manifest, view_names, fail_under, as_json) -> None:
    """``robustvtc report`` on an encoder-only campaign: its view or its report; no accuracy gate."""
    from .campaign import views

    wrong = [v for v in view_names if v not in views.ENCODER_VIEWS]
    if wrong:
        raise UserInputError(f"view {wrong[0]!r} needs answers, and {results} is an encoder-only campaign; accepted: "
                             f"{', '.join(views.ENCODER_VIEWS)}")
    if fail_under is not None:
        raise UserInputError(f"--fail-under gates on robust accuracy, and {results} is an encoder-only campaign; "
                             "accepted: no --fail-under")
    tables = {name: views.VIEWS[name](df, manifest) for name in view_names}
    if view_names and not as_json:
        for name, table in tables.items():
            click.echo(f"{name}:\n{table.to_string(na_rep='–')}\n")
    if not view_names:
        from .campaign.report import write_report

        paths = write_report(results, out, df=df, manifest=manifest)
        LOG.info(f"{paths['html']}\n{paths['markdown']}")
    _encoder_outcome(df, manifest, results, as_json, quiet=True, tables=tables if view_names else None)


@main.command()
@click.argument("a", type=click.Path(exists=True, file_okay=False))
@click.argument("b", type=click.Path(exists=True, file_okay=False))
@click.option("--fail-drop", type=click.FloatRange(min=0), default=None, metavar="POINTS",
              help="Gate: in every shared cell, robust accuracy in B may be at most POINTS below A with confidence "
                   "(paired over samples with the same id): exit 1 when a cell's whole interval drops more, 4 when "
                   "an interval straddles POINTS (INCONCLUSIVE).")
@CONFIDENCE
@INCONCLUSIVE
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Also write the comparison to a CSV file.")
@JSON
@verbosity
@handle_errors
def compare(a, b, fail_drop, confidence, on_inconclusive, csv_path, as_json):
    """Robust accuracy per cell of two campaigns (e.g. before/after a defense or model change), B - A.

    \b
    Example:
      robustvtc compare runs/baseline runs/candidate --fail-drop 5
    """
    from .campaign.formatting import display_table
    from .campaign.gates import comparison_gate
    from .campaign.metrics import load_records
    from .safe_io import write_csv

    result = comparison_gate(load_records(a), load_records(b), (fail_drop or 0) / 100, confidence)
    table = result.cells
    if table.empty:
        raise UserInputError(f"{a} and {b} share no attack x eps x compressor x budget x defense cell")
    table = table.assign(change=-table["drop"])
    if csv_path:
        write_csv(table, csv_path)
    if as_json:
        _emit_json({"a": a, "b": b, "cells": json.loads(table.to_json(orient="records")),
                    "gate": result.as_dict() if fail_drop is not None else None})
    else:
        shown = display_table(table[["attack", "eps", "compressor", "budget", "defense", "adaptive", "n_a", "n_b"]])
        shown["A (%)"] = table["accuracy_a"].map(lambda v: f"{100 * v:.1f}")
        shown["B (%)"] = table["accuracy_b"].map(lambda v: f"{100 * v:.1f}")
        shown["B - A (points)"] = table["change"].map(lambda v: f"{100 * v:+.1f}")
        shown[f"CI ({100 * result.cell_level:.3g} %)"] = [f"{-100 * hi:+.1f} to {-100 * lo:+.1f}" for lo, hi in
                                                         zip(table["ci_low"], table["ci_high"])]
        click.echo(shown.to_string(index=False))
    if fail_drop is not None:
        _gate(result, on_inconclusive)


# ---------------------------------------------------------------------------------------------- plugins
@main.command("list")
@click.argument("kind", type=click.Choice(["models", "compressors", "attacks", "defenses", "scenarios"]))
@click.argument("pattern", default="*")
@handle_errors
def list_cmd(kind, pattern):
    """List built-in models and supported families, registered plugins and shipped scenarios (wildcards
    allowed).

    \b
    Examples:
      robustvtc list models
      robustvtc list compressors 'prune*'
      robustvtc list scenarios
    """
    import fnmatch

    if kind == "models":
        from .models import ADAPTERS, BUILTIN_MODELS

        rows = [(n, "built-in", str(BUILTIN_MODELS[n])) for n in sorted(BUILTIN_MODELS) if fnmatch.fnmatch(n, pattern)]
        rows += [(family, "family", f"{cls.__name__}: any checkpoint whose config.model_type is {family!r}")
                 for family, cls in sorted(ADAPTERS.items()) if fnmatch.fnmatch(family, pattern)]
        _print_rows(("name", "kind", "what"), rows)
    elif kind == "compressors":
        from .compression import COMPRESSORS

        rows = [(n, c.stage, "yes" if c.text_aware else "no", c.native_knob, getattr(c, "fidelity", "") or "-")
                for n, c in COMPRESSORS.items() if n in COMPRESSORS.names(pattern)]
        _print_rows(("name", "stage", "text-aware", "native knob", "fidelity"), rows)
        from .compression import NOT_REGISTERED

        unregistered = [(n, why) for n, why in NOT_REGISTERED.items() if fnmatch.fnmatch(n, pattern)]
        if unregistered:
            click.echo("\nseed methods not registered, and why:")
            for n, why in unregistered:
                click.echo(f"  {n}: {why}")
    elif kind == "attacks":
        from .attacks import ATTACKS

        from .attacks.torchattack import TorchAttack, refusal, torchattacks_names

        rows = [(n, getattr(c, "role", ""), c.threat.describe()) for n, c in ATTACKS.items()
                if n in ATTACKS.names(pattern)]
        threat = f"{TorchAttack.threat.describe()} (through the answer scores)"
        rows += [(n, TorchAttack.role, threat if not refusal(n) else "refused in campaigns: " + refusal(n).split(";")[0])
                 for n in torchattacks_names() if fnmatch.fnmatch(n, pattern)]
        _print_rows(("name", "role", "threat model"), rows)
    elif kind == "defenses":
        from .campaign.scenario import defense_registry

        registry = defense_registry()
        names = registry.names(pattern) if registry is not None else []
        _print_rows(("name", "hook"), [(n, getattr(registry.get(n), "hook", "")) for n in names] or [("none", "")])
    else:
        from .campaign.scenario import resolve_path, shipped_scenarios
        from .safe_io import load_yaml

        rows = []
        for name in shipped_scenarios():
            if fnmatch.fnmatch(name, pattern):  # the description as written: no plugin (torch) is imported
                raw = load_yaml(resolve_path(name))
                first = str((raw or {}).get("description") or "").strip().split(". ")[0]
                rows.append((name, first if len(first) <= 100 else first[:99] + "…"))
        _print_rows(("name", "description"), rows)


def _print_rows(header, rows) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in (header, *rows):
        click.echo("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())


if __name__ == "__main__":
    main()
