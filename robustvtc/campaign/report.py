"""Reports computed only from a campaign folder: results.jsonl, manifest.json and the examples sidecar.

``write_report`` writes ``report/report.html`` (one self-contained file: inline CSS, plots as base64 PNG,
no external URL, so it can be mailed or attached to a CI run), ``report/summary.md`` and
``report/tables/*.csv``. Other parts of robustvtc may add sections: if ``robustvtc.sanity`` defines
``report_sections(records: pandas.DataFrame) -> list[(title, markdown or html)]`` they are appended.
"""
from __future__ import annotations

import base64
import html
import io
import json
import re
from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from . import metrics as M
from .runner import EXAMPLES, MANIFEST

PERCENT = ("robust_accuracy", "ci_low", "ci_high", "clean_accuracy", "full_token_accuracy", "attack_success_rate",
           "csfr", "accuracy", "fulltoken_accuracy", "cage_accuracy", "gap")


def format_eps(eps: float) -> str:
    """0.0313... -> "8/255" when ε is a multiple of 1/255 (how ε is usually quoted), else 4 significant digits."""
    if eps == 0:
        return "0"
    k = eps * 255
    if abs(k - round(k)) < 1e-6:
        return f"{Fraction(round(k), 255)}" if round(k) % 255 == 0 else f"{round(k)}/255"
    return f"{eps:.4g}"


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """Percentages with one decimal, ε as x/255, other floats with 3 decimals (a copy)."""
    out = table.copy()
    for col in out.columns:
        if col == "eps":
            out[col] = out[col].map(format_eps)
        elif col in PERCENT:
            out[col] = out[col].map(lambda v: "–" if pd.isna(v) else f"{100 * v:.1f}")
        elif pd.api.types.is_float_dtype(out[col]):
            out[col] = out[col].map(lambda v: "–" if pd.isna(v) else f"{v:.3f}")
    return out


def markdown_table(table: pd.DataFrame) -> str:
    shown = display_table(table).astype(str)
    lines = ["| " + " | ".join(shown.columns) + " |", "|" + "---|" * len(shown.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in shown.itertuples(index=False)]
    return "\n".join(lines)


def html_table(table: pd.DataFrame) -> str:
    return display_table(table).to_html(index=False, border=0, classes="t", na_rep="–", escape=True)


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
    """Robust accuracy vs budget, one panel per compressor x ε, a line per attack; all tokens at the right."""
    plain = summary[(summary["defense"] == "none") & ~summary["adaptive"]]
    compressors = [c for c in plain["compressor"].unique() if c != "none"]
    eps_values = sorted(e for e in plain["eps"].unique() if e > 0) or [0.0]
    if not compressors:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(eps_values), len(compressors), squeeze=False, sharey=True,
                             figsize=(3.4 * len(compressors) + 1, 2.8 * len(eps_values) + 0.4))
    for r, eps in enumerate(eps_values):
        for c, comp in enumerate(compressors):
            ax = axes[r][c]
            for attack in plain["attack"].unique():
                at = [eps, 0.0] if attack == "clean" else [eps]
                rows = plain[(plain["attack"] == attack) & plain["eps"].isin(at)]
                line = rows[rows["compressor"] == comp].sort_values("budget")
                full = rows[rows["compressor"] == "none"]
                xs, ys = list(line["budget"]), list(line["robust_accuracy"] * 100)
                if not full.empty:
                    xs.append(int(full["budget"].iloc[0]))
                    ys.append(float(full["robust_accuracy"].iloc[0]) * 100)
                if xs:
                    style = dict(color="black", linestyle="--") if attack == "clean" else {}
                    ax.plot(xs, ys, marker="o", label=attack, **style)
            ax.set_title(f"{comp}, ε={format_eps(eps)}", fontsize=9)
            ax.set_ylim(-2, 102)
            ax.grid(alpha=0.3)
            if r == len(eps_values) - 1:
                ax.set_xlabel("visual tokens kept" + (f" (all = {num_tokens})" if num_tokens else ""))
            if c == 0:
                ax.set_ylabel("accuracy (%)")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _png(fig)


def plot_gap_heatmap(gap: pd.DataFrame) -> str | None:
    """Overestimation gap (points) per compressor x budget, one panel per ε, no defense (all tokens: see the table)."""
    plain = gap[(gap["defense"] == "none") & ~gap["adaptive"].astype(bool) & (gap["compressor"] != "none")]
    if plain.empty:
        return None
    plt = _pyplot()
    eps_values = sorted(plain["eps"].unique())
    fig, axes = plt.subplots(1, len(eps_values), squeeze=False, figsize=(4.2 * len(eps_values) + 0.5, 3.2))
    for ax, eps in zip(axes[0], eps_values):
        table = plain[plain["eps"] == eps].pivot_table(index="compressor", columns="budget", values="gap") * 100
        limit = max(5.0, float(np.nanmax(np.abs(table.values))))
        im = ax.imshow(table.values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
        ax.set_xticks(range(len(table.columns)), [str(c) for c in table.columns])
        ax.set_yticks(range(len(table.index)), list(table.index))
        for (i, j), v in np.ndenumerate(table.values):
            if np.isfinite(v):
                ax.text(j, i, f"{v:+.0f}", ha="center", va="center", fontsize=8,
                        color="white" if abs(v) > 0.6 * limit else "black")
        ax.set_xlabel("budget")
        ax.set_title(f"ε={format_eps(eps)}", fontsize=9)
        fig.colorbar(im, ax=ax, label="gap (points)")
    fig.tight_layout()
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
        overlap = len(clean_set & adv_set) / max(1, len(clean_set | adv_set))
        row[1].text(0.0, -0.08, f"sample {e['sample']}, ε={format_eps(e['eps'])}, kept IoU {overlap:.2f}",
                    transform=row[1].transAxes, fontsize=7, va="top")
    fig.tight_layout()
    return _png(fig)


def _example_entries(folder: Path, limit: int = 6) -> list[dict]:
    """One map per attack (largest ε, first sample, first compressor at its smallest budget)."""
    path = folder / "examples.jsonl"
    if not path.is_file():
        return []
    entries = {}
    for line in path.read_text().splitlines():
        if line.strip():
            e = json.loads(line)
            entries[(e["sample"], e["attack"], e["eps"], e["compressor"], e["budget"])] = e
    chosen = {}
    for e in sorted(entries.values(), key=lambda e: (-e["eps"], str(e["sample"]), e["compressor"], e["budget"])):
        chosen.setdefault(e["attack"], e)
    return list(chosen.values())[:limit]


# ---------------------------------------------------------------------------------------------- extra sections
def extra_sections(records: pd.DataFrame) -> list[tuple[str, str]]:
    """Sections contributed by ``robustvtc.sanity.report_sections`` when that module exists."""
    import importlib

    try:
        sanity = importlib.import_module("robustvtc.sanity")
    except ModuleNotFoundError as exc:
        if exc.name != "robustvtc.sanity":
            raise
        return []
    hook: Callable | None = getattr(sanity, "report_sections", None)
    return [] if hook is None else [(str(t), str(body)) for t, body in hook(records)]


def markdown_to_html(text: str) -> str:
    """The Markdown that report sections use: headings, paragraphs, bullet lists, pipe tables, `code`, **bold**."""
    if text.lstrip().startswith("<"):
        return text
    out = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = block.splitlines()
        if all(line.strip().startswith("|") for line in lines):
            rows = [[_inline(c.strip()) for c in line.strip().strip("|").split("|")] for line in lines
                    if not re.fullmatch(r"\s*\|?[\s:|-]+\|?\s*", line)]
            head, *body = rows or [[]]
            out.append('<table class="t"><thead><tr>' + "".join(f"<th>{c}</th>" for c in head) + "</tr></thead><tbody>"
                       + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in body)
                       + "</tbody></table>")
        elif all(re.match(r"\s*[-*] ", line) for line in lines):
            items = [_inline(re.sub(r"^\s*[-*] ", "", line)) for line in lines]
            out.append("<ul>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>")
        elif lines[0].startswith("#"):
            out.append(f"<h4>{_inline(lines[0].lstrip('#').strip())}</h4>")
            if lines[1:]:
                out.append(f"<p>{_inline(' '.join(lines[1:]))}</p>")
        else:
            out.append(f"<p>{_inline(' '.join(lines))}</p>")
    return "\n".join(out)


def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


# ---------------------------------------------------------------------------------------------- the report
CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd}
table.t{border-collapse:collapse;font-size:.85em;margin:.6em 0}table.t th,table.t td{padding:.2em .6em;
border-bottom:1px solid #eee;text-align:right}table.t th{background:#f6f6f6}img{max-width:100%}
.note{color:#555;font-size:.9em}.gate{padding:.6em 1em;background:#f4f7fb;border-left:4px solid #4a7bd0}
pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:.8em}"""


def build_tables(df: pd.DataFrame, n_boot: int = M.N_BOOT, seed: int = 0) -> dict[str, pd.DataFrame]:
    return {"summary": M.summary(df, n_boot, seed), "clean": M.clean_accuracy(df, n_boot, seed),
            "worst_case": M.worst_case(df, n_boot, seed), "gap": M.overestimation_gap(df, n_boot=n_boot, seed=seed),
            "ranking": M.ranking_stability(df, n_boot, seed), "perturbation": M.perturbation(df)}


def write_report(results: str | Path, out: str | Path | None = None, n_boot: int = M.N_BOOT,
                 seed: int = 0) -> dict[str, Path]:
    """Write report.html, summary.md and tables/*.csv for a campaign folder; returns their paths."""
    results = Path(results)
    df = M.load_records(results)
    manifest = json.loads((results / MANIFEST).read_text()) if (results / MANIFEST).is_file() else {}
    out = Path(out) if out is not None else results / "report"
    (out / "tables").mkdir(parents=True, exist_ok=True)
    tables = build_tables(df, n_boot, seed)
    paths = {}
    for name, table in tables.items():
        paths[name] = out / "tables" / f"{name}.csv"
        table.to_csv(paths[name], index=False)

    scenario = manifest.get("scenario", {})
    title = f"robustvtc report — {scenario.get('name', results.name)}"
    worst, where = M.min_robust_accuracy(df)
    gate = (f"Lowest worst-case robust accuracy: <b>{100 * worst:.1f} %</b> at "
            + html.escape(", ".join(f"{k}={format_eps(v) if k == 'eps' else v}" for k, v in where.items()
                                    if k in ("eps", "compressor", "budget", "defense")))
            + " (what <code>--fail-under</code> gates on).")
    s = tables["summary"]
    attacked = s[s["attack"] != "clean"]
    num_tokens = manifest.get("model", {}).get("num_visual_tokens")
    sections: list[tuple[str, str, str]] = []  # (title, html, markdown)

    def add(name: str, intro: str, table: pd.DataFrame | None, image: str | None = None) -> None:
        body = f'<p class="note">{intro}</p>'
        md = intro
        if image:
            body += f'<img alt="{html.escape(name)}" src="data:image/png;base64,{image}">'
        if table is not None and not table.empty:
            body += html_table(table)
            md += "\n\n" + markdown_table(table)
        sections.append((name, body, md))

    add("Clean accuracy", "Accuracy (%) on the unattacked images per compressor x budget x defense, 95 % bootstrap CI.",
        tables["clean"])
    add("Robust accuracy vs budget",
        "Accuracy (%) on the adversarial images, no defense. The rightmost point of each line is the full-token "
        "model (compressor none). Lines that drop as the budget shrinks mean compression makes the model easier "
        "to attack.", accuracy_pivot(attacked, "robust_accuracy"), plot_budget_curves(s, num_tokens))
    add("Worst case over attacks",
        "Per sample, correct under every attack run at that ε on that cell (adaptive attacks included): the "
        "robust accuracy against the whole suite, 95 % CI.", tables["worst_case"])
    gap = tables["gap"]
    add("Overestimation gap (fulltoken − cage)",
        "Robust accuracy (points) under the full-token baseline minus under the compression-aligned attack, "
        "same samples; positive = full-token testing overestimates the robustness of the compressed model. "
        "CI: paired bootstrap over samples." if not gap.empty else
        "Needs both a `fulltoken` and a `cage` attack at the same ε; this campaign has no such pair.",
        gap, plot_gap_heatmap(gap))
    csfr = attacked[attacked["compressor"] != "none"]
    add("Attack success and compression-specific failures",
        "Attack success rate = share of clean-correct samples the attack flips. CSFR = share of samples wrong "
        "under compression but right with all tokens on the same adversarial image (failures full-token "
        "testing never sees).", csfr[["attack", "eps", "compressor", "budget", "defense", "adaptive", "n",
                                      "attack_success_rate", "csfr", "kept_overlap", "kept_disruption"]])
    add("Ranking stability",
        "Correlation of the clean and adversarial CLS-attention importance per image (1 = the attack left the "
        "ranking a compressor keeps tokens by intact), 95 % CI for Spearman.", tables["ranking"],
        plot_ranking(tables["ranking"]))
    add("Perturbations and cost", "Norms in [0, 1] pixel space at the model's input resolution; seconds to craft "
        "one adversarial image (per sample).", tables["perturbation"])
    examples = _example_entries(results / EXAMPLES)
    if examples:
        add("Kept tokens, clean vs adversarial", "The patches the compressor keeps (others dimmed) on the clean "
            "image and on the adversarial one.", None, plot_examples(results / EXAMPLES, examples))
    for name, text in extra_sections(df):
        sections.append((name, markdown_to_html(text), text))

    meta = {k: manifest.get(k) for k in ("scenario_hash", "seed", "dtype", "device", "batch_size", "versions", "git",
                                         "started", "status", "records")}
    meta["model"] = manifest.get("model", {}).get("name")
    head = (f"<p>{len(df)} records, {df['sample'].nunique()} samples, model <code>{html.escape(str(meta['model']))}"
            f"</code>, status {html.escape(str(meta['status']))}.</p><p class=\"gate\">{gate}</p>")
    doc = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
           f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>{head}"]
    doc += [f"<h2>{html.escape(name)}</h2>{body}" for name, body, _ in sections]
    doc.append(f"<h2>Reproducibility</h2><pre>{html.escape(json.dumps(meta, indent=2, default=str))}</pre>"
               f"<pre>{html.escape(json.dumps(scenario, indent=2))}</pre></body></html>")
    paths["html"] = out / "report.html"
    paths["html"].write_text("\n".join(doc), encoding="utf-8")
    md = [f"# {title}", "", f"{len(df)} records, {df['sample'].nunique()} samples, model `{meta['model']}`.", "",
          re.sub(r"</?(b|code)>", lambda m: "**" if m.group(1) == "b" else "`", gate), ""]
    md += [f"## {name}\n\n{text}\n" for name, _, text in sections]
    paths["markdown"] = out / "summary.md"
    paths["markdown"].write_text("\n".join(md), encoding="utf-8")
    return paths


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
