"""Reports from a campaign folder: files, self-contained HTML, Markdown, CSV, extra sections (the real browser:
tests/test_report_browser.py)."""
from __future__ import annotations

import re
import shutil
import sys
import types

import pandas as pd
import pytest

from robustvtc.campaign import parse_scenario, run_campaign
from robustvtc.campaign.formatting import format_eps
from robustvtc.campaign.report import write_report


@pytest.fixture(scope="module")
def campaign_dir(tiny_adapter, tmp_path_factory):
    s = parse_scenario({"compressors": ["fastervlm", "visionzip"], "budgets": [16, 32], "samples": 4,
                        "batch_size": 2, "steps": 1, "attacks": ["fulltoken", "cage"], "examples": 1})
    return run_campaign(s, output=tmp_path_factory.mktemp("c") / "run", adapter=tiny_adapter, quiet=True)


@pytest.fixture(scope="module")
def report(campaign_dir):
    return write_report(campaign_dir)


def test_files_and_tables(report, campaign_dir):
    assert report["html"] == campaign_dir / "report" / "report.html"
    for name in ("summary", "clean", "worst_case", "gap", "verdict", "kept_distortion", "ranking", "perturbation"):
        assert report[name].is_file(), name
    summary = pd.read_csv(report["summary"])
    assert {"attack", "eps", "compressor", "budget", "robust_accuracy", "ci_low", "ci_high", "csfr", "csfr_n",
            "compression_only_failure_rate"} <= set(summary)
    assert len(summary) == 3 * 5  # (clean, fulltoken, cage) x (none + 2 compressors x 2 budgets)
    gap = pd.read_csv(report["gap"])
    assert set(gap["compressor"]) == {"none", "fastervlm", "visionzip"}


def test_html_is_self_contained(report):
    text = report["html"].read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert not re.search(r"(?i)https?://|//cdn|<script|<link|@import|url\(", text)
    sources = re.findall(r'src="([^"]*)"', text)
    assert len(sources) >= 4 and all(s.startswith("data:image/png;base64,") for s in sources)
    for title in ("Clean accuracy", "Robust accuracy vs budget", "Overestimation gap per cell", "Ranking stability",
                  "Kept-token distortion", "Attack settings", "Kept tokens, clean vs adversarial", "Reproducibility",
                  "Sanity checks against gradient masking"):
        assert f"<h2>{title}" in text, title
    # the question first, the glossary last; no defense sections in a campaign without defenses
    assert text.index('<h2 id="verdict">Verdict') < text.index("<h2>Clean accuracy")
    assert '<h2 id="glossary">Glossary' in text and "CIRA, arXiv 2609.35002" in text.split("Glossary")[-1]
    assert "Defenses" not in text and "_no records_" not in text and "No sign of gradient masking" not in text
    assert re.search(r'<p class="verdict">(Full-token testing overestimates|No significant overestimation)', text)


def test_markdown_summary(report):
    md = report["markdown"].read_text()
    assert md.startswith("# robustvtc report")
    assert "## Overestimation gap per cell (fulltoken − cage)" in md and "| eps | compressor | budget |" in md
    assert md.index("## Verdict") < md.index("## Clean accuracy") < md.index("## Glossary")
    assert "| ε | cell | n | clean % (CI) | baseline % (CI) | aligned % (CI) | gap, points (family CI) |" in md
    assert "8/255" in md and "data:image" not in md


def test_report_needs_only_the_results(campaign_dir, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(campaign_dir / "results.jsonl", copy)  # no manifest, no sidecar: still a report
    paths = write_report(copy)
    assert "Kept tokens" not in paths["html"].read_text() and paths["markdown"].is_file()


def test_eps_format_and_templates_escape_labels(tmp_path):
    from robustvtc.campaign.formatting import Section, paragraph, render, table_block

    assert format_eps(8 / 255) == "8/255" and format_eps(0.03) == "0.03" and format_eps(0) == "0"
    assert format_eps(1.0) == "1"
    sections = [Section("<b>t</b>", [paragraph("a `code` <script>x</script>"),
                                     table_block([{"attack": "<script>", "n": "3|4"}])])]
    page = render("report.html.j2", title="T", head="h", sections=sections, css="")
    assert "<code>code</code>" in page and "<script>" not in page and "&lt;script&gt;" in page
    md = render("summary.md.j2", title="T", head="h", sections=sections)
    assert "<script>" not in md and "| &lt;script&gt; | 3\\|4 |" in md


def test_verdict_names_what_is_missing_and_schedule_differences(campaign_dir, tmp_path):
    import json

    copy = tmp_path / "only_baseline"
    copy.mkdir()
    lines = [line for line in (campaign_dir / "results.jsonl").read_text().splitlines()
             if json.loads(line)["attack"] != "cage"]
    (copy / "results.jsonl").write_text("\n".join(lines) + "\n")
    manifest = json.loads((campaign_dir / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps(manifest))
    text = write_report(copy)["html"].read_text()
    assert "No verdict: this campaign has no compression-aligned attack" in text
    # the manifest's attack options: a differing schedule is named in the verdict section
    manifest["attacks"]["fulltoken"]["params"]["steps"] = 7
    manifest["schedule_differences"] = ["fulltoken"]
    (campaign_dir / "manifest.json").rename(campaign_dir / "manifest.keep")
    try:
        (campaign_dir / "manifest.json").write_text(json.dumps(manifest))
        text = write_report(campaign_dir, tmp_path / "r2")["html"].read_text()
    finally:
        (campaign_dir / "manifest.keep").replace(campaign_dir / "manifest.json")
    verdict = text.split('<h2 id="verdict">')[1].split("<h2>")[0]
    assert '<p class="warn">' in verdict and "steps: fulltoken 7, cage 1" in verdict


def test_tables_scroll_instead_of_overflowing(report):
    text = report["html"].read_text()
    assert text.count('<div class="scroll"><table') == text.count("<table")
    assert ".scroll{overflow-x:auto" in text and "max-width:800px" in text


def test_fail_on_unreliable_flag_and_scenario_key(tmp_path):
    """cage's accuracy on visionzip@16 rises from 3/12 at 8/255 to 12/12 at 32/255: monotone_in_eps is violated."""
    import json

    from click.testing import CliRunner

    from robustvtc.cli import main

    rows = []
    for s in range(12):
        base = {"sample": s, "compressor": "visionzip", "budget": 16, "defense": "none", "adaptive": False,
                "clean_correct": True, "full_token_correct": True, "clean_full_token_correct": True,
                "kept_overlap": 0.5, "rank_spearman": 0.5, "rank_kendall": 0.5, "kept_disruption": 0.2, "l2": 1.0,
                "seconds": 0.1}
        rows += [{**base, "attack": "clean", "eps": 0.0, "correct": True, "linf": 0.0},
                 {**base, "attack": "clean", "eps": 0.0, "compressor": "none", "budget": 144, "correct": True,
                  "linf": 0.0},
                 {**base, "attack": "cage", "eps": 8 / 255, "correct": s < 3, "linf": 8 / 255},
                 {**base, "attack": "cage", "eps": 32 / 255, "correct": True, "linf": 32 / 255}]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runner = CliRunner()
    ok = runner.invoke(main, ["report", str(tmp_path), "-o", str(tmp_path / "r")])
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(main, ["report", str(tmp_path), "-o", str(tmp_path / "r"), "--fail-on-unreliable"])
    assert bad.exit_code == 1
    assert "unreliable: 1 gradient-masking check(s) violated: monotone_in_eps: cage on visionzip@16" in bad.output
    (tmp_path / "manifest.json").write_text(json.dumps({"scenario": {"fail_on_unreliable": True}}))
    assert runner.invoke(main, ["report", str(tmp_path), "-o", str(tmp_path / "r")]).exit_code == 1
    assert runner.invoke(main, ["report", str(tmp_path), "-o", str(tmp_path / "r"),
                                "--no-fail-on-unreliable"]).exit_code == 0


def test_fail_on_unreliable_is_a_scenario_key_outside_the_hash():
    base = {"compressors": ["visionzip"], "budgets": [16], "attacks": ["cage"]}
    on = parse_scenario({**base, "fail_on_unreliable": True})
    assert on.fail_on_unreliable and not parse_scenario(base).fail_on_unreliable
    assert on.hash() == parse_scenario(base).hash()
