"""Reports computed only from a campaign folder: results.jsonl, manifest.json and the examples sidecar.

``write_report`` writes ``report/report.html`` (one self-contained file: inline CSS, plots as base64 PNG,
no external URL, so it can be mailed or attached to a CI run), ``report/summary.md`` and
``report/tables/*.csv``. The verdict comes first; the gradient-masking and defense sections come from
:mod:`.masking`. Both documents render the same :class:`~.formatting.Section` s through jinja2 templates.
"""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..safe_io import FolderLock, atomic_write_text, write_csv
from . import masking
from . import metrics
from .folder import check_report_folder
from .formatting import Block, Section, format_eps, image_block, paragraph, render, table_block
from .records import EXAMPLES, read_manifest

# ---------------------------------------------------------------------------------------------- plots
def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_budget_curves(summary: pd.DataFrame, num_tokens: int | None) -> str | None:
    """Robust accuracy vs budget with its 95 % Clopper--Pearson band, one panel per compressor x ε, a line per
    attack (clean dashed); the full-token model at the right; one legend for every panel."""
    plain = summary[(summary["defense"] == "none") & ~summary["adaptive"]]
    compressors = [c for c in plain["compressor"].unique() if c != "none"]
    eps_values = sorted(e for e in plain["eps"].unique() if e > 0) or [0.0]
    if not compressors:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(eps_values), len(compressors), squeeze=False, sharey=True,
                             figsize=(3.4 * len(compressors) + 1, 2.7 * len(eps_values) + 0.6))
    attacks = list(plain["attack"].unique())
    colours = {a: ("black" if a == "clean" else f"C{i}") for i, a in enumerate(a for a in attacks if a != "clean")}
    colours["clean"] = "black"
    for r, eps in enumerate(eps_values):
        for c, comp in enumerate(compressors):
            ax = axes[r][c]
            for attack in attacks:
                at = [eps, 0.0] if attack == "clean" else [eps]
                rows = plain[(plain["attack"] == attack) & plain["eps"].isin(at)]
                line = rows[rows["compressor"] == comp].sort_values("budget")
                full = rows[rows["compressor"] == "none"]
                pts = pd.concat([line, full.iloc[:1]]) if not full.empty else line
                if pts.empty:
                    continue
                xs = pts["budget"].astype(float).to_numpy()
                style = dict(color=colours[attack], linestyle="--" if attack == "clean" else "-")
                ax.plot(xs, pts["robust_accuracy"] * 100, marker="o", markersize=3.5, label=attack, **style)
                ax.fill_between(xs, pts["ci_low"] * 100, pts["ci_high"] * 100, color=colours[attack], alpha=0.12,
                                linewidth=0)
            ax.set_title(f"{comp}, ε={format_eps(eps)}", fontsize=9)
            ax.grid(alpha=0.3)
            if r == len(eps_values) - 1:
                ax.set_xlabel("visual tokens kept" + (f" (all = {num_tokens})" if num_tokens else ""), fontsize=8)
            if c == 0:
                ax.set_ylabel("accuracy (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, [f"{lab} (95 % CI band)" if lab != "clean" else lab for lab in labels],
               loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return _png(fig)


def plot_gap_points(table: pd.DataFrame, num_tokens: int | None) -> str | None:
    """The verdict's gap (points) per budget on its own y-scale, with its family-level interval as error bars;
    one panel per ε, one series per compressor, the full-token model at the right; '*' = significant."""
    if table.empty:
        return None
    plt = _pyplot()
    eps_values = sorted(table["eps"].unique())
    fig, axes = plt.subplots(1, len(eps_values), squeeze=False, sharey=True,
                             figsize=(4.4 * len(eps_values) + 0.6, 3.3))
    compressors = [c for c in dict.fromkeys(table["compressor"]) if c != "none"] + ["none"]
    budgets = sorted(table.loc[table["compressor"] != "none", "budget"].unique())
    full = sorted(table.loc[table["compressor"] == "none", "budget"].unique())
    ticks = budgets + [b for b in full if b not in budgets]
    for ax, eps in zip(axes[0], eps_values):
        rows = table[table["eps"] == eps]
        for i, comp in enumerate(compressors):
            g = rows[rows["compressor"] == comp].sort_values("budget")
            if g.empty:
                continue
            x = np.array([ticks.index(b) for b in g["budget"]], dtype=float)
            x += 0 if comp == "none" else (i - (len(compressors) - 2) / 2) * 0.15
            y = g["gap"] * 100
            err = np.vstack([y - g["ci_low"] * 100, g["ci_high"] * 100 - y])
            colour = "black" if comp == "none" else f"C{i}"
            ax.errorbar(x, y, yerr=err, fmt="o", markersize=4, capsize=3, color=colour,
                        label="none (all tokens)" if comp == "none" else comp)
            for xi, yi, hi, sig in zip(x, y, g["ci_high"] * 100, g["significant"]):
                if sig:
                    ax.annotate("*", (xi, hi), ha="center", va="bottom", fontsize=12, color=colour)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(ticks)), [f"all ({b})" if b in full and b not in budgets else str(b) for b in ticks],
                      fontsize=8)
        ax.set_xlim(-0.5, len(ticks) - 0.5)
        ax.set_title(f"ε={format_eps(eps)}", fontsize=9)
        ax.set_xlabel("visual tokens kept", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("gap (points): baseline − aligned")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return _png(fig)


def plot_gap_heatmap(table: pd.DataFrame) -> str | None:
    """The verdict's gap (points) per compressor x budget, one panel per ε, on one shared symmetric colour
    scale, the full-token cell (none@N) included; '*' marks a significant cell."""
    if table.empty:
        return None
    plt = _pyplot()
    eps_values = sorted(table["eps"].unique())
    limit = max(5.0, float(np.nanmax(np.abs(table["gap"].to_numpy(dtype=float) * 100))))
    order = [c for c in dict.fromkeys(table["compressor"]) if c != "none"] + ["none"]
    fig, axes = plt.subplots(1, len(eps_values), squeeze=False, figsize=(3.9 * len(eps_values) + 1.2, 2.9))
    for ax, eps in zip(axes[0], eps_values):
        rows = table[table["eps"] == eps]
        values = rows.pivot_table(index="compressor", columns="budget", values="gap").reindex(
            [c for c in order if c in set(rows["compressor"])]) * 100
        marks = rows.pivot_table(index="compressor", columns="budget", values="significant",
                                 aggfunc="max").reindex(values.index).reindex(columns=values.columns)
        cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#e6e6e6")  # grey: no such cell (none has one budget)
        im = ax.imshow(np.ma.masked_invalid(values.values), cmap=cmap, vmin=-limit, vmax=limit, aspect="auto")
        ax.set_xticks(range(len(values.columns)), [str(c) for c in values.columns], fontsize=8)
        ax.set_yticks(range(len(values.index)), list(values.index), fontsize=8)
        for (i, j), v in np.ndenumerate(values.values):
            if np.isfinite(v):
                star = "*" if bool(marks.values[i, j] == 1) else ""
                ax.text(j, i, f"{v:+.0f}{star}", ha="center", va="center", fontsize=8,
                        color="white" if abs(v) > 0.6 * limit else "black")
        ax.set_xlabel("budget", fontsize=8)
        ax.set_title(f"ε={format_eps(eps)}", fontsize=9)
    fig.colorbar(im, ax=list(axes[0]), label="gap (points)", shrink=0.9)
    return _png(fig)


def plot_kept_distortion(table: pd.DataFrame) -> str | None:
    """Kept-token distortion per compressor@budget with its t interval, one marker per attack, one panel per ε;
    above each aligned attack: the share of samples where it beats the baseline on the same image and cell."""
    if table.empty:
        return None
    plt = _pyplot()
    eps_values = sorted(table["eps"].unique())
    attacks = list(dict.fromkeys(table.sort_values("role", key=lambda r: r != "baseline")["attack"]))
    cells = list(dict.fromkeys(f"{c}@{b}" for c, b in table.sort_values(["compressor", "budget"])[
        ["compressor", "budget"]].itertuples(index=False)))
    fig, axes = plt.subplots(len(eps_values), 1, squeeze=False, sharey=True,
                             figsize=(max(5.0, 0.9 * len(cells) + 1.5), 2.6 * len(eps_values) + 0.5))
    for ax, eps in zip(axes[:, 0], eps_values):
        rows = table[table["eps"] == eps]
        for i, attack in enumerate(attacks):
            g = rows[rows["attack"] == attack]
            x = np.array([cells.index(f"{c}@{b}") for c, b in zip(g["compressor"], g["budget"])], dtype=float)
            x += (i - (len(attacks) - 1) / 2) * 0.22
            err = np.vstack([g["mean"] - g["ci_low"], g["ci_high"] - g["mean"]])
            ax.errorbar(x, g["mean"], yerr=np.nan_to_num(err), fmt="o", markersize=4, capsize=2, color=f"C{i}",
                        label=attack)
            for xi, hi, wins in zip(x, g["ci_high"], g["wins"]):
                if np.isfinite(wins):
                    ax.annotate(f"{100 * wins:.0f}%", (xi, hi), ha="center", va="bottom", fontsize=6.5,
                                color=f"C{i}")
        ax.set_xticks(range(len(cells)), cells, fontsize=7, rotation=20)
        ax.set_title(f"ε={format_eps(eps)}", fontsize=9)
        ax.set_ylabel("1 − cos, kept tokens", fontsize=8)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return _png(fig)


def plot_ranking(ranking: pd.DataFrame) -> str | None:
    plain = ranking[(ranking["defense"] == "none") & ~ranking["adaptive"].astype(bool)]
    if plain.empty:
        return None
    plt = _pyplot()
    labels = [f"{a}\nε={format_eps(e)}" for a, e in zip(plain["attack"], plain["eps"])]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(plain)), 3.0))
    x = np.arange(len(plain))
    err = np.vstack([plain["spearman"] - plain["spearman_low"], plain["spearman_high"] - plain["spearman"]])
    ax.bar(x - 0.18, plain["spearman"], 0.36, yerr=np.nan_to_num(err), capsize=3, label="Spearman")
    ax.bar(x + 0.18, plain["kendall"], 0.36, label="Kendall")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylim(min(0.0, float(plain["kendall"].min()) - 0.05), 1.02)
    ax.set_ylabel("clean vs adversarial rank corr.")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def plot_examples(folder: Path, entries: list[dict]) -> str | None:
    """Clean and adversarial image, each with the patches the compressor kept (others dimmed)."""
    if not entries:
        return None
    from PIL import Image

    plt = _pyplot()
    fig, axes = plt.subplots(len(entries), 2, squeeze=False, figsize=(5.2, 2.7 * len(entries)))
    for row, e in zip(axes, entries):
        for ax, image, kept, what in ((row[0], e["clean_image"], e["kept_clean"], "clean"),
                                      (row[1], e["adv_image"], e["kept_adv"], e["attack"])):
            pixels = np.asarray(Image.open(folder / image).convert("RGB"), dtype=float) / 255
            gh, gw = e["grid"]
            mask = np.zeros(gh * gw)
            mask[kept] = 1
            mask = np.kron(mask.reshape(gh, gw), np.ones((pixels.shape[0] // gh, pixels.shape[1] // gw)))
            ax.imshow(pixels * (0.25 + 0.75 * mask[..., None]))
            ax.set_title(f"{what} — {e['compressor']}@{e['budget']}", fontsize=8)
            ax.axis("off")
        clean_set, adv_set = set(e["kept_clean"]), set(e["kept_adv"])
        overlap = len(clean_set & adv_set) / max(1, len(clean_set))  # |kept_adv ∩ kept_clean| / K
        row[1].text(0.0, -0.08, f"sample {e['sample']}, ε={format_eps(e['eps'])}, kept-set overlap {overlap:.2f}",
                    transform=row[1].transAxes, fontsize=7, va="top")
    fig.tight_layout()
    return _png(fig)


def _example_entries(folder: Path, limit: int = 6) -> list[dict]:
    """One map per attack (largest ε, first sample, first compressor at its smallest budget)."""
    path = folder / "examples.jsonl"
    if not path.is_file():
        return []
    entries = {}
    for line in path.read_text(errors="replace").splitlines():
        try:  # one entry per key, the last wins (a unit run again by --resume); a torn line (a kill) is skipped
            e = json.loads(line)
            entries[(e["sample"], e["attack"], e["eps"], e["compressor"], e["budget"])] = e
        except (ValueError, KeyError, TypeError):
            continue
    chosen = {}
    for e in sorted(entries.values(), key=lambda e: (-e["eps"], str(e["sample"]), e["compressor"], e["budget"])):
        chosen.setdefault(e["attack"], e)
    return list(chosen.values())[:limit]


# ---------------------------------------------------------------------------------------------- the report
CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd}
.scroll{overflow-x:auto;max-width:100%;margin:.6em 0}
table.t{border-collapse:collapse;font-size:.82em;margin:0}table.t th,table.t td{padding:.2em .55em;
border-bottom:1px solid #eee;text-align:right;white-space:nowrap}table.t th{background:#f6f6f6}
table.t td:first-child,table.t th:first-child{position:sticky;left:0;background:#fff;text-align:left}
table.t th:first-child{background:#f6f6f6}img{max-width:100%}
.note{color:#555;font-size:.9em}.gate{padding:.6em 1em;background:#f4f7fb;border-left:4px solid #4a7bd0}
.verdict{padding:.7em 1em;background:#fff8e6;border-left:4px solid #d08a1a;font-size:1.05em}
.warn{padding:.5em 1em;background:#fdecea;border-left:4px solid #c0392b}
pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:.8em}dt{font-weight:600;margin-top:.5em}
dd{margin-left:1.2em}@media (max-width:800px){body{margin:1em auto}table.t{font-size:.74em}
table.t th,table.t td{padding:.15em .35em}}"""


def build_tables(df: pd.DataFrame, n_boot: int = metrics.N_BOOT, seed: int = 0,
                 roles: dict | None = None, verdict: dict | None = None) -> dict[str, pd.DataFrame]:
    """The report's tables; ``verdict``: :func:`~.metrics.verdict` of ``df`` and ``roles`` when already computed."""
    roles = roles if roles is not None else metrics.attack_roles(list(df["attack"].unique()))
    verdict = verdict if verdict is not None else metrics.verdict(df, roles)
    baselines = [a for a, r in roles.items() if r == metrics.BASELINE]
    aligned = [a for a, r in roles.items() if r == metrics.ALIGNED]
    gap = (metrics.overestimation_gap(df, baselines[0], aligned[0]) if baselines and aligned
           else metrics.overestimation_gap(df))
    return {"summary": metrics.summary(df), "clean": metrics.clean_accuracy(df), "worst_case": metrics.worst_case(df),
            "gap": gap, "verdict": verdict["table"], "kept_distortion": metrics.kept_distortion(df, roles),
            "ranking": metrics.ranking_stability(df, n_boot, seed), "perturbation": metrics.perturbation(df)}


def _ci(value: float, low: float, high: float, signed: bool = False) -> str:
    if pd.isna(value):
        return "–"
    fmt = "{:+.1f}" if signed else "{:.1f}"
    return f"{fmt.format(100 * value)} ({fmt.format(100 * low)} to {fmt.format(100 * high)})"


def verdict_display(table: pd.DataFrame) -> pd.DataFrame:
    """The verdict table as shown: one string per cell, accuracies and gap with their intervals."""
    return pd.DataFrame({
        "ε": table["eps"].map(format_eps), "cell": table["compressor"] + "@" + table["budget"].astype(str),
        "n": table["n"].astype(int),
        "clean % (CI)": [_ci(*r) for r in table[["clean_accuracy", "clean_low", "clean_high"]].to_numpy()],
        "baseline": table["baseline"],
        "baseline % (CI)": [_ci(*r) for r in table[["baseline_accuracy", "baseline_low", "baseline_high"]].to_numpy()],
        "aligned": table["aligned"],
        "aligned % (CI)": [_ci(*r) for r in table[["aligned_accuracy", "aligned_low", "aligned_high"]].to_numpy()],
        "gap, points (family CI)": [_ci(*r, signed=True) for r in table[["gap", "ci_low", "ci_high"]].to_numpy()],
        "McNemar p": table["p_value"].map(lambda p: f"{p:.2g}"),
        "significant": [("reference" if c == "none" else "yes" if s else "no")
                        for c, s in zip(table["compressor"], table["significant"])],
    })


SCHEDULE = ("steps", "alpha", "random_start")


def attack_settings(manifest: dict) -> tuple[pd.DataFrame, list[str]]:
    """Each attack's resolved options (from the manifest) and the labels whose schedule (steps, alpha,
    random_start) differs from the others' (``manifest["schedule_differences"]`` when the runner wrote it)."""
    attacks = manifest.get("attacks") or {}
    rows = []
    for label, info in attacks.items():
        params = dict(info.get("params") or {})
        row = {"attack": label, "name": info.get("name", label), "ε": ", ".join(format_eps(float(e)) for e in
                                                                             info.get("eps") or [])}
        row.update({k: _option(params.pop(k, "–")) for k in SCHEDULE})
        row["other options"] = ", ".join(f"{k}={v}" for k, v in sorted(params.items()) if v is not None)
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table, []
    differ = []  # "alpha: fulltoken 1/255, cage 0.5/255"
    labels = ([str(x) for x in manifest.get("schedule_differences") or []] if "schedule_differences" in manifest
              else None)
    for key in SCHEDULE:
        values = table[key].astype(str)
        if values.nunique() > 1 and (labels is None or labels):
            differ.append(f"{key}: " + ", ".join(f"{a} {_option(v)}" for a, v in zip(table["attack"], table[key])))
    if labels and not differ:
        differ.append(", ".join(labels))
    return table, differ


def _option(value) -> str:
    """Step sizes as x/255 (0.5/255 too), other values as they are."""
    if isinstance(value, float):
        k = value * 255
        return f"{round(k, 2):g}/255" if value and abs(k * 100 - round(k * 100)) < 1e-6 else f"{value:.4g}"
    return str(value)


def _glossary() -> Section:
    return Section("Glossary", [Block("list", items=[f"{name}: {text} Source: {source}."
                                                      for name, text, source in metrics.GLOSSARY])], anchor="glossary")


def write_report(results: str | Path, out: str | Path | None = None, n_boot: int = metrics.N_BOOT,
                 seed: int = 0, *, locked: bool = False, df: pd.DataFrame | None = None, manifest: dict | None = None,
                 verdict: dict | None = None) -> dict[str, Path]:
    """Write report.html, summary.md and tables/*.csv for a campaign folder (into ``out``, default
    ``results/report``); returns their paths. Holds the lock of the campaign folder (of ``out`` when it lies
    elsewhere) unless the caller does (``locked``: :func:`~robustvtc.campaign.runner.run_campaign`); refuses,
    in one line naming it, a symlinked report folder or file and a report file robustvtc did not write.

    ``df``, ``manifest``: the folder's records and manifest when the caller has read them (else read here);
    ``verdict``: :func:`~.metrics.verdict` of those records with their attacks' roles, when computed."""
    results = Path(results)
    out = Path(out) if out is not None else results / "report"
    root = check_report_folder(results, out)  # fail fast, before the statistics
    if locked:
        return _write_report(results, out, n_boot, seed, df=df, manifest=manifest, verdict=verdict)
    with FolderLock(root):
        return _write_report(results, out, n_boot, seed, df=df, manifest=manifest, verdict=verdict)


def _write_report(results: Path, out: Path, n_boot: int, seed: int, df: pd.DataFrame | None = None,
                  manifest: dict | None = None, verdict: dict | None = None) -> dict[str, Path]:
    df = df if df is not None else metrics.load_records(results)
    manifest = (manifest if manifest is not None else read_manifest(results)) or {}
    from . import encoder_report

    if encoder_report.is_encoder_campaign(df, manifest):
        return _write_encoder_report(results, out, df, manifest)
    roles = metrics.attack_roles(list(df["attack"].unique()), manifest)
    verdict = verdict if verdict is not None else metrics.verdict(df, roles)
    tables = build_tables(df, n_boot, seed, roles, verdict)
    paths = _write_tables(results, out, tables)

    scenario = manifest.get("scenario", {})
    title = f"robustvtc report — {scenario.get('name', results.name)}"
    worst, where = metrics.min_robust_accuracy(df)
    gate = (f"Lowest worst-case robust accuracy: {100 * worst:.1f} % at "
            + ", ".join(f"{k}={format_eps(v) if k == 'eps' else v}" for k, v in where.items()
                        if k in ("eps", "compressor", "budget", "defense"))
            + " (`--fail-under PCT` gates on every cell's confidence interval, Bonferroni over cells).")
    s = tables["summary"]
    attacked = s[s["attack"] != "clean"]
    num_tokens = manifest.get("model", {}).get("num_visual_tokens")
    sections: list[Section] = [_verdict_section(verdict, manifest, num_tokens, gate)]

    def add(name: str, intro: str, table: pd.DataFrame | None, image: str | None = None,
            formatted: bool = False) -> None:
        blocks = [paragraph(intro)]
        if image:
            blocks.append(image_block(name, image))
        if table is not None and not table.empty:
            blocks.append(table_block(table, formatted))
        sections.append(Section(name, blocks))

    add("Clean accuracy", "Accuracy (%) on the unattacked images per compressor x budget x defense, 95 % "
        "Clopper–Pearson interval.", tables["clean"])
    from .views import benchmark

    bench = benchmark(df, manifest)
    if not bench.empty:
        add(f"Benchmark: {scenario.get('data', {}).get('preset')}",
            "The benchmark's official figures per attack × ε × compressor × budget, no defense "
            "(robustvtc.data.hf.aggregate): VQA soft accuracy or exact match (%), POPE accuracy / precision / recall / "
            "F1 / yes-ratio (%), MME perception and cognition (points).",
            bench.reset_index().assign(eps=lambda t: t["eps"].map(format_eps)).rename(columns={"eps": "ε"}),
            formatted=True)
    from .views import DOWNSAMPLING, difficulty

    split = difficulty(df, manifest)
    if not split.empty:
        add("Accuracy by difficulty (VTC-Bench)",
            f"VTC-Bench's filter: among the samples the uncompressed model answers correctly, \"easy\" ones are those "
            f"plain downsampling to the same budget ({DOWNSAMPLING}, the D x D average pool of the token grid) still "
            "answers, \"difficult\" the rest. Each method's accuracy (%) on each group, clean and on each attack's "
            "images (groups from the clean images), no defense; 95 % Clopper–Pearson intervals. A method that only "
            "matches downsampling on easy samples adds nothing; the difficult column is where it earns its keep.",
            split.reset_index(), formatted=True)
    add("Robust accuracy vs budget",
        "Accuracy (%) on the adversarial images, no defense; bands: 95 % Clopper–Pearson intervals. The rightmost "
        "point of each line is the full-token model (compressor none). Lines that drop as the budget shrinks mean "
        "compression makes the model easier to attack.", accuracy_pivot(attacked, "robust_accuracy"),
        plot_budget_curves(s, num_tokens), formatted=True)
    kd = tables["kept_distortion"]
    if not kd.empty:
        shown = kd.assign(eps=kd["eps"].map(format_eps), cell=kd["compressor"] + "@" + kd["budget"].astype(str),
                          **{"distortion (95 % CI)": [f"{m:.3f} ({lo:.3f} to {hi:.3f})" for m, lo, hi in
                                                      kd[["mean", "ci_low", "ci_high"]].to_numpy()],
                             "wins vs baseline % (CI)": [_ci(w, lo, hi) for w, lo, hi in
                                                         kd[["wins", "wins_low", "wins_high"]].to_numpy()]})
        shown = shown[["eps", "cell", "attack", "role", "n", "distortion (95 % CI)", "versus",
                       "wins vs baseline % (CI)"]].rename(columns={"eps": "ε"})
        add("Kept-token distortion",
            "Mean 1 − cos between the adversarial and clean features of the tokens the compressor keeps (what "
            "CAGE's expected feature disruption maximises), per compressor × budget, no defense, 95 % t interval. "
            "Wins: share of samples where the compression-aligned attack distorts the kept tokens more than the "
            "baseline on the same image and cell (Clopper–Pearson).", shown, plot_kept_distortion(kd),
            formatted=True)
    add("Worst case over attacks",
        "Per sample, correct under every attack run at that ε on that cell (adaptive attacks included): the "
        "robust accuracy against the whole suite, 95 % Clopper–Pearson interval.", tables["worst_case"])
    gap = tables["gap"]
    if not gap.empty:
        add(f"Overestimation gap per cell ({gap.columns[6].removesuffix('_accuracy')} − "
            f"{gap.columns[7].removesuffix('_accuracy')})",
            "Every defense and adaptive setting: robust accuracy (points) under the baseline minus under the "
            "aligned attack, same samples; 95 % Newcombe paired interval and exact McNemar p-value, uncorrected "
            "(the verdict above corrects its family).", gap)
    csfr = attacked[attacked["compressor"] != "none"]
    add("Attack success and compression-specific failures",
        "Attack success rate = share of clean-correct samples the attack flips. CSFR (as CIRA defines it) = among "
        "the csfr_n samples both paths answered correctly on the clean image, the share wrong under compression "
        "and right with all tokens after the attack (95 % Clopper–Pearson). compression_only_failure_rate = the "
        "same event over all samples. kept_overlap = |kept_adv ∩ kept_clean| / K.",
        csfr[["attack", "eps", "compressor", "budget", "defense", "adaptive", "n", "attack_success_rate", "csfr",
              "csfr_n", "csfr_low", "csfr_high", "compression_only_failure_rate", "kept_overlap",
              "kept_disruption"]])
    fata = metrics.fata_metrics(df, roles)
    if not fata.empty:
        shown = fata.assign(**{
            "ε": fata["eps"].map(format_eps),
            "K_prac": [("none" if not np.isfinite(k) else str(int(k))) for k in fata["k_prac"]],
            "SR %": [f"{100 * v:.1f}" if np.isfinite(v) else "–" for v in fata["sr"]],
            "CER % (CI)": [_ci(v, lo, hi) for v, lo, hi in fata[["cer", "cer_low", "cer_high"]].to_numpy()],
            "CBR % (CI)": [_ci(v, lo, hi) for v, lo, hi in fata[["cbr", "cbr_low", "cbr_high"]].to_numpy()]})
        add("Compression-triggered failures (FATA's SR, CER, CBR at K_prac)",
            "Per attack × ε × compressor, no defense (FATA, arXiv 2609.39134): K_prac = the smallest budget whose "
            "clean accuracy keeps ≥ 80 % of the full-token clean accuracy (from clean results only); SR = the "
            "attack's full-token accuracy / the clean full-token accuracy (stealth: high is hidden from full-token "
            "testing); CER = error at K_prac; CBR = among the cbr_n samples correct clean and attacked with all "
            "tokens and clean at K_prac, the share wrong attacked at K_prac. 95 % Clopper–Pearson intervals.",
            shown[["ε", "compressor", "attack", "role", "K_prac", "SR %", "CER % (CI)", "CBR % (CI)", "cbr_n"]],
            formatted=True)
    add("Ranking stability",
        "Correlation of the clean and adversarial CLS-attention importance per image (1 = the attack left the "
        "ranking a compressor keeps tokens by intact), 95 % bootstrap interval for Spearman.", tables["ranking"],
        plot_ranking(tables["ranking"]))
    add("Perturbations and cost", "Norms in [0, 1] pixel space at the model's input resolution; seconds to craft "
        "one adversarial image (per sample).", tables["perturbation"])
    settings, differ = attack_settings(manifest)
    if not settings.empty:
        add("Attack settings", "Each attack's resolved options as the manifest records them. "
            + (f"Schedules differ: {'; '.join(differ)}." if differ else "All attacks share one schedule (steps, "
               "step size, random start)."), settings.astype(str), formatted=True)
    examples = _example_entries(results / EXAMPLES)
    if examples:
        add("Kept tokens, clean vs adversarial", "The patches the compressor keeps (others dimmed) on the clean "
            "image and on the adversarial one; kept-set overlap = |kept_adv ∩ kept_clean| / K.", None,
            plot_examples(results / EXAMPLES, examples))
    sections += masking.report_sections(df)
    head = (f"{len(df)} records, {df['sample'].nunique()} samples, model {manifest.get('model', {}).get('name')}, "
            f"status {manifest.get('status')}.")
    return _write_documents(out, paths, title, head, sections, manifest)


def _write_documents(out: Path, paths: dict[str, Path], title: str, head: str, sections: list[Section],
                     manifest: dict) -> dict[str, Path]:
    """Append the reproducibility and glossary sections; write report.html and summary.md from the templates."""
    meta = {k: manifest.get(k) for k in ("scenario_hash", "seed", "dtype", "device", "batch_size", "versions", "git",
                                         "started", "status", "records")}
    meta["model"] = manifest.get("model", {}).get("name")
    sections = [*sections, Section("Reproducibility", [
        Block("pre", text=json.dumps(meta, indent=2, default=str)),
        Block("pre", text=json.dumps(manifest.get("scenario", {}), indent=2))]), _glossary()]
    paths["html"] = out / "report.html"
    atomic_write_text(paths["html"], render("report.html.j2", title=title, head=head, sections=sections, css=CSS))
    paths["markdown"] = out / "summary.md"
    atomic_write_text(paths["markdown"], render("summary.md.j2", title=title, head=head, sections=sections))
    return paths


def _write_tables(results: Path, out: Path, tables: dict[str, pd.DataFrame]) -> dict[str, Path]:
    """Check the report folder (under the lock, before the first file) and write ``tables/*.csv``."""
    check_report_folder(results, out, [*(f"tables/{name}.csv" for name in tables), "report.html", "summary.md"],
                        prepare=True)
    paths = {}
    for name, table in tables.items():
        paths[name] = out / "tables" / f"{name}.csv"
        write_csv(table, paths[name])
    return paths


def _write_encoder_report(results: Path, out: Path, df: pd.DataFrame, manifest: dict) -> dict[str, Path]:
    """The report of an encoder-only campaign (:mod:`.encoder_report`): no accuracy, the screening's figures."""
    from . import encoder_report

    roles = metrics.attack_roles(list(df["attack"].unique()), manifest)
    tables = {"encoder_screening": metrics.screening(df, roles), "full_token": encoder_report.full_token(df)}
    paths = _write_tables(results, out, tables)
    scenario = manifest.get("scenario", {})
    title = f"robustvtc encoder screening — {scenario.get('name', results.name)}"
    screening = tables["encoder_screening"]
    sections = encoder_report.sections(df, manifest, screening, tables["full_token"],
                                       plot_kept_distortion(screening))
    settings, differ = attack_settings(manifest)
    if not settings.empty:
        sections.append(Section("Attack settings", [paragraph(
            "Each attack's resolved options as the manifest records them. " + (
                f"Schedules differ: {'; '.join(differ)}." if differ else "All attacks share one schedule (steps, "
                "step size, random start).")), table_block(settings.astype(str), formatted=True)]))
    model = manifest.get("model", {})
    head = (f"{len(df)} records, {df['sample'].nunique()} images, encoder of {model.get('name')} "
            f"({model.get('num_visual_tokens')} tokens), status {manifest.get('status')}.")
    return _write_documents(out, paths, title, head, sections, manifest)


def _verdict_section(v: dict, manifest: dict, num_tokens: int | None, gate: str) -> Section:
    """The question the report exists for, first: does full-token testing overestimate robustness here?
    ``v``: :func:`~.metrics.verdict`."""
    vt = v["table"]
    note = ("Per ε × compressor × budget, no defense: clean accuracy, robust accuracy under the strongest "
            "full-token baseline (" + (", ".join(v["baselines"]) or "none") + ") and under the strongest "
            "compression-aligned attack (" + (", ".join(v["aligned"]) or "none") + "), same samples, with "
            "95 % Clopper–Pearson intervals; the gap (baseline − aligned, points; positive = full-token "
            "testing overestimates robustness) with Newcombe's paired score interval. ")
    if v["cells"]:
        note += (f"The family of {v['cells']} compressed comparisons (compressor × budget × aligned attack × ε) is "
                 f"Bonferroni-corrected: gap intervals are simultaneous {100 * v['family_level']:.2f} % intervals "
                 f"and a gap is significant when its exact McNemar p-value is below "
                 f"{(1 - v['level']) / v['cells']:.2g} (family-wise 5 %) and its interval excludes 0. The "
                 "uncompressed row (none) is a reference outside the family.")
    blocks = [paragraph(v["sentence"], "verdict"), paragraph(note)]
    _, differ = attack_settings(manifest)
    if differ:
        blocks.append(paragraph("The attacks compared do not share one schedule, so a gap may reflect the "
                                f"optimiser, not the objective: {'; '.join(differ)} (see Attack settings).", "warn"))
    if not vt.empty:
        shown = verdict_display(vt)
        # one baseline and one aligned attack: their names are in the note above, the table keeps to numbers
        blocks.append(table_block(shown.drop(columns=[c for c in ("baseline", "aligned") if vt[c].nunique() == 1]),
                                  formatted=True))
        blocks += [image_block("overestimation gap", image) for image in (plot_gap_points(vt, num_tokens),
                                                                          plot_gap_heatmap(vt)) if image]
        blocks.append(paragraph("Top: the gap per budget on its own scale, error bars = the family interval. "
                                "Bottom: the same gaps on one shared symmetric colour scale; * = significant after "
                                "correction."))
    blocks.append(paragraph(gate, "gate"))
    return Section("Verdict: does full-token testing overestimate robustness?", blocks, anchor="verdict")


def accuracy_pivot(summary: pd.DataFrame, value: str) -> pd.DataFrame:
    """Rows attack x ε x defense, columns compressor@budget: the at-a-glance table."""
    if summary.empty:
        return summary
    summary = summary.sort_values("attack", key=lambda a: a != "clean", kind="stable")  # clean first
    table = summary.assign(cell=summary["compressor"] + "@" + summary["budget"].astype(str),
                           defense=summary["defense"] + np.where(summary["adaptive"], " (adaptive)", ""))
    wide = table.pivot_table(index=["attack", "eps", "defense"], columns="cell", values=value, aggfunc="first",
                             sort=False)
    wide = wide.map(lambda v: "–" if pd.isna(v) else f"{100 * v:.1f}")
    return wide.reset_index().rename_axis(columns=None)
