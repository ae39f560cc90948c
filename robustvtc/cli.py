"""Command line: ``robustvtc run | validate | report | compare | evaluate | list``.

Exit codes: 0 success (or a gate PASS), 1 gate FAIL, 2 usage error (bad input; one line, no traceback),
3 runtime error, 4 gate INCONCLUSIVE (the confidence interval straddles the requirement; ``--inconclusive
pass`` turns it into 0), 130 interrupted.
Scenario values are defaults; flags given on the command line override them (black-style).
"""
from __future__ import annotations

import os
import sys
from functools import wraps

import click

from .errors import UserInputError

EXIT_GATE, EXIT_USAGE, EXIT_RUNTIME, EXIT_INCONCLUSIVE = 1, 2, 3, 4


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def handle_errors(fn):
    """User errors -> one line on stderr and exit 2; unexpected errors -> exit 3 (traceback only with --debug)."""
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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="robustvtc")
def main() -> None:
    """Adversarial-robustness testing for vision-language models that compress their visual tokens."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@main.command()
@click.option("--model", default="builtin", show_default=True, help="'builtin', a llava-hf directory or a hub id.")
@click.option("--compressors", default="none,random,fastervlm", show_default=True, help="Comma-separated names.")
@click.option("--budgets", default="16,32,48", show_default=True, help="Comma-separated token budgets ('all' = every token).")
@click.option("--samples", default=500, show_default=True, type=click.IntRange(min=1), help="Test-split samples.")
@click.option("--batch-size", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, help="Seed of randomised compressors.")
@click.option("--by-type", is_flag=True, help="Also print accuracy per question type.")
@click.option("--records", type=click.Path(dir_okay=False), help="Write the per-sample records to this CSV.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", default="float32", show_default=True)
@handle_errors
def evaluate(model, compressors, budgets, samples, batch_size, seed, by_type, records, device, dtype):
    """Clean accuracy for every compressor x budget on the synthetic test split.

    \b
    Example:
      robustvtc evaluate --compressors none,random,fastervlm --budgets 16,32,48 --by-type
    """
    from .compression import COMPRESSORS
    from .evaluate import accuracy_table, evaluate as run_eval, parse_budgets
    from .models import load_model

    names = _csv(compressors)
    for name in names:
        COMPRESSORS.get(name)  # fail fast, before loading the model
    adapter = load_model(model, device=device, dtype=dtype)
    budget_list = parse_budgets(_csv(budgets), adapter.num_visual_tokens)
    from tqdm import tqdm

    with tqdm(total=samples, desc="evaluate", unit="img", disable=None, file=sys.stderr) as bar:
        df = run_eval(adapter, names, budget_list, samples=samples, seed=seed, batch_size=batch_size,
                      progress=bar.update)
    if records:
        df.to_csv(records, index=False)
    click.echo(f"Clean accuracy (%) of {adapter.name} on {samples} test samples; columns = visual tokens kept "
               f"(of {adapter.num_visual_tokens})")
    click.echo(accuracy_table(df).to_string(na_rep="-"))
    if by_type:
        click.echo("\nPer question type:")
        click.echo(accuracy_table(df, by_type=True).to_string(na_rep="-"))


# ---------------------------------------------------------------------------------------------- campaigns
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


def _gate_options(fn):
    """--fail-under PCT, --confidence LEVEL, --inconclusive fail|pass."""
    fn = click.option("--inconclusive", "on_inconclusive", type=click.Choice(["fail", "pass"]), default="fail",
                      show_default=True, help="What an INCONCLUSIVE gate does: fail the job (exit 4) or pass it.")(fn)
    fn = click.option("--confidence", type=click.FloatRange(0.5, 1, max_open=True), default=0.95, show_default=True,
                      help="Confidence level of the gate's intervals (family-wise, Bonferroni over cells).")(fn)
    return FAIL_UNDER(fn)


FAIL_UNDER = click.option("--fail-under", type=click.FloatRange(0, 100), default=None, metavar="PCT",
                          help="Gate: every compressor x budget x defense x eps cell's worst-case robust accuracy "
                               "must be >= PCT with confidence: exit 1 when a cell's whole interval is below, 4 when "
                               "an interval straddles PCT (INCONCLUSIVE).")
FAIL_ON_UNRELIABLE = click.option(
    "--fail-on-unreliable/--no-fail-on-unreliable", default=None,
    help="Exit 1 when a gradient-masking sanity check is violated (results the report marks unreliable); "
         "default: the scenario's fail_on_unreliable.")


def _fail_on_unreliable(df, enabled: bool) -> None:
    """Exit 1 with one line naming the violated sanity checks (``--fail-on-unreliable``)."""
    if not enabled:
        return
    from .sanity import violations

    found = violations(df)
    if found:
        click.echo(f"unreliable: {len(found)} gradient-masking check(s) violated: {'; '.join(found)}", err=True)
        sys.exit(EXIT_GATE)


SET = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                   help="Override any scenario key (dotted path, YAML value), e.g. --set attacks.0.steps=5.")


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
@SET
@click.option("--resume", is_flag=True, help="Continue the campaign in the output folder (same scenario only).")
@click.option("--overwrite", is_flag=True, help="Delete the files campaigns wrote in the output folder (listed in "
              "its manifest; nothing else) and start again.")
@click.option("--allow-existing-files", is_flag=True,
              help="Write the campaign into a folder that already holds other files (they are left alone).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or tables (CI).")
@click.option("--report/--no-report", default=True, show_default=True, help="Write the report when done.")
@_gate_options
@FAIL_ON_UNRELIABLE
@handle_errors
def run(scenario, model, samples, seed, device, dtype, batch_size, eot_samples, save_images, output, threads, sets,
        resume, overwrite, allow_existing_files, quiet, report, fail_under, confidence, on_inconclusive,
        fail_on_unreliable):
    """Run a campaign: results.jsonl + manifest.json (+ report/) in the scenario's output folder.

    SCENARIO is a YAML file or the name of a shipped scenario (robustvtc list scenarios).

    \b
    Examples:
      robustvtc run quickstart
      robustvtc run my.yaml --samples 20 --device cuda --dtype bf16 -o runs/try1
      robustvtc run my.yaml --resume                 # after a crash or Ctrl-C
      robustvtc run my.yaml --quiet --fail-under 40  # CI gate: exit 1 below 40 %, 4 if undecided
    """
    if resume and overwrite:
        raise UserInputError("--resume and --overwrite contradict each other; accepted: one of them")
    from .campaign import load_scenario, run_campaign
    from .campaign import metrics as M

    flags = {"model": model, "samples": samples, "seed": seed, "device": device, "dtype": dtype,
             "batch_size": batch_size, "eot_samples": eot_samples, "save_images": save_images, "output": output,
             "threads": threads}
    spec = load_scenario(scenario, _overrides(flags, sets))
    if spec.threads:
        import torch

        torch.set_num_threads(spec.threads)
    log = None if quiet else (lambda m: click.echo(m, err=True))
    try:
        out = run_campaign(spec, resume=resume, overwrite=overwrite, quiet=quiet, log=log,
                           allow_existing=allow_existing_files, report=report)  # the report under the lock
    except KeyboardInterrupt:
        click.echo(f"interrupted; continue with: robustvtc run {scenario} --resume", err=True)
        sys.exit(130)
    df = M.load_records(out)
    if report and not quiet:
        click.echo(f"report: {out / 'report' / 'report.html'}", err=True)
    if not quiet:
        _print_summary(df)
    if fail_under is not None:
        from .campaign.gates import robustness_gate

        _gate(robustness_gate(df, fail_under / 100, confidence), on_inconclusive)
    _fail_on_unreliable(df, spec.fail_on_unreliable if fail_on_unreliable is None else fail_on_unreliable)


def _print_summary(df) -> None:
    from .campaign import metrics as M
    from .campaign.report import accuracy_pivot, display_table

    table = M.summary(df, n_boot=1)
    plain = table[(table["defense"] == "none") & ~table["adaptive"]]
    click.echo("Accuracy (%) without defense; columns compressor@budget")
    click.echo(display_table(accuracy_pivot(plain, "robust_accuracy")).drop(columns="defense").to_string(index=False))


@main.command()
@click.argument("scenarios", nargs=-1, required=True)
@SET
@handle_errors
def validate(scenarios, sets):
    """Check scenario files without running them (unknown keys, bad values, unknown plugins).

    \b
    Examples:
      robustvtc validate my.yaml
      robustvtc validate scenarios/*.yaml
    """
    from .campaign import load_scenario

    for name in scenarios:
        s = load_scenario(name, _overrides({}, sets))
        pairs = sum(len(a.eps) for a in s.attacks)
        click.echo(f"{name}: ok -- {s.samples} samples, {len(s.compressors)} compressors x {len(s.budgets)} budgets, "
                   f"{len(s.attacks)} attacks ({pairs} attack x eps), defenses: "
                   f"{', '.join(['none', *(d.label for d in s.defenses)])}; output {s.output}")


@main.command("rebuild-manifest")
@click.argument("scenario")
@click.option("-o", "--output", default=None, type=click.Path(file_okay=False), help="The campaign folder.")
@SET
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
    out = rebuild_manifest(spec, log=lambda m: click.echo(m, err=True))
    click.echo(f"{out / 'manifest.json'} rebuilt; continue with: robustvtc run {scenario} -o {out} --resume")


@main.command("report")
@click.argument("results", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", default=None, type=click.Path(file_okay=False), help="Default: RESULTS/report.")
@click.option("--bootstrap", default=1000, show_default=True, type=click.IntRange(min=1), help="Bootstrap resamples.")
@click.option("--seed", default=0, show_default=True, help="Bootstrap seed.")
@_gate_options
@FAIL_ON_UNRELIABLE
@handle_errors
def report_cmd(results, out, bootstrap, seed, fail_under, confidence, on_inconclusive, fail_on_unreliable):
    """Write report.html (self-contained), summary.md and tables/*.csv from a campaign's results.

    \b
    Examples:
      robustvtc report runs/quickstart
      robustvtc report runs/nightly --fail-under 40   # gate on stored results
    """
    from .campaign import metrics as M
    from .campaign.report import write_report

    paths = write_report(results, out, n_boot=bootstrap, seed=seed)
    for key in ("html", "markdown"):
        click.echo(paths[key])
    if fail_under is not None:
        from .campaign.gates import robustness_gate

        _gate(robustness_gate(M.load_records(results), fail_under / 100, confidence), on_inconclusive)
    if fail_on_unreliable is None:
        from .campaign.runner import read_manifest

        fail_on_unreliable = bool(((read_manifest(results) or {}).get("scenario") or {}).get("fail_on_unreliable"))
    _fail_on_unreliable(M.load_records(results), fail_on_unreliable)


@main.command()
@click.argument("a", type=click.Path(exists=True, file_okay=False))
@click.argument("b", type=click.Path(exists=True, file_okay=False))
@click.option("--fail-drop", type=click.FloatRange(min=0), default=None, metavar="POINTS",
              help="Gate: in every shared cell, robust accuracy in B may be at most POINTS below A with confidence "
                   "(paired over samples with the same id): exit 1 when a cell's whole interval drops more, 4 when "
                   "an interval straddles POINTS (INCONCLUSIVE).")
@click.option("--confidence", type=click.FloatRange(0.5, 1, max_open=True), default=0.95, show_default=True,
              help="Confidence level of the gate's intervals (family-wise, Bonferroni over cells).")
@click.option("--inconclusive", "on_inconclusive", type=click.Choice(["fail", "pass"]), default="fail",
              show_default=True, help="What an INCONCLUSIVE gate does: fail the job (exit 4) or pass it.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Also write the comparison to a CSV file.")
@handle_errors
def compare(a, b, fail_drop, confidence, on_inconclusive, csv_path):
    """Robust accuracy per cell of two campaigns (e.g. before/after a defense or model change), B - A.

    \b
    Example:
      robustvtc compare runs/baseline runs/candidate --fail-drop 5
    """
    from .campaign import metrics as M
    from .campaign.gates import comparison_gate
    from .campaign.report import display_table

    result = comparison_gate(M.load_records(a), M.load_records(b), (fail_drop or 0) / 100, confidence)
    table = result.cells
    if table.empty:
        raise UserInputError(f"{a} and {b} share no attack x eps x compressor x budget x defense cell")
    table = table.assign(change=-table["drop"])
    if csv_path:
        table.to_csv(csv_path, index=False)
    shown = display_table(table[["attack", "eps", "compressor", "budget", "defense", "adaptive", "n_a", "n_b"]])
    shown["A (%)"] = table["accuracy_a"].map(lambda v: f"{100 * v:.1f}")
    shown["B (%)"] = table["accuracy_b"].map(lambda v: f"{100 * v:.1f}")
    shown["B - A (points)"] = table["change"].map(lambda v: f"{100 * v:+.1f}")
    shown[f"CI ({100 * result.cell_level:.3g} %)"] = [f"{-100 * hi:+.1f} to {-100 * lo:+.1f}" for lo, hi in
                                                     zip(table["ci_low"], table["ci_high"])]
    click.echo(shown.to_string(index=False))
    if fail_drop is not None:
        _gate(result, on_inconclusive)


@main.command("list")
@click.argument("kind", type=click.Choice(["models", "compressors", "attacks", "defenses", "scenarios"]))
@click.argument("pattern", default="*")
@handle_errors
def list_cmd(kind, pattern):
    """List registered plugins and shipped scenarios (wildcards allowed).

    \b
    Examples:
      robustvtc list compressors 'prune*'
      robustvtc list attacks
      robustvtc list scenarios
    """
    if kind == "models":
        from .models import list_models

        for name in list_models():
            click.echo(name)
    elif kind == "compressors":
        from .compression import COMPRESSORS

        rows = [(n, c.stage, "yes" if c.text_aware else "no", c.native_knob) for n, c in COMPRESSORS.items()
                if n in COMPRESSORS.names(pattern)]
        _print_rows(("name", "stage", "text-aware", "native knob"), rows)
    elif kind == "attacks":
        from .attacks import ATTACKS

        rows = [(n, c.threat.describe()) for n, c in ATTACKS.items() if n in ATTACKS.names(pattern)]
        _print_rows(("name", "threat model"), rows)
    elif kind == "defenses":
        from .campaign.scenario import defense_registry

        registry = defense_registry()
        names = registry.names(pattern) if registry is not None else []
        _print_rows(("name", "hook"), [(n, getattr(registry.get(n), "hook", "")) for n in names] or [("none", "")])
    else:
        import fnmatch

        from .campaign.scenario import load_scenario, shipped_scenarios

        rows = []
        for name in shipped_scenarios():
            if fnmatch.fnmatch(name, pattern):
                first = load_scenario(name).description.strip().split(". ")[0]
                rows.append((name, first if len(first) <= 100 else first[:99] + "…"))
        _print_rows(("name", "description"), rows)


def _print_rows(header, rows) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in (header, *rows):
        click.echo("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())


if __name__ == "__main__":
    main()
