"""Reports from a campaign folder: files, self-contained HTML, Markdown, CSV, extra sections, a real browser."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import types

import pandas as pd
import pytest

from robustvtc.campaign import parse_scenario, run_campaign
from robustvtc.campaign.report import format_eps, markdown_to_html, write_report


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
    for name in ("summary", "clean", "worst_case", "gap", "ranking", "perturbation"):
        assert report[name].is_file(), name
    summary = pd.read_csv(report["summary"])
    assert {"attack", "eps", "compressor", "budget", "robust_accuracy", "ci_low", "ci_high", "csfr"} <= set(summary)
    assert len(summary) == 3 * 5  # (clean, fulltoken, cage) x (none + 2 compressors x 2 budgets)
    gap = pd.read_csv(report["gap"])
    assert set(gap["compressor"]) == {"none", "fastervlm", "visionzip"}


def test_html_is_self_contained(report):
    text = report["html"].read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert not re.search(r"(?i)https?://|//cdn|<script|<link|@import|url\(", text)
    sources = re.findall(r'src="([^"]*)"', text)
    assert len(sources) >= 4 and all(s.startswith("data:image/png;base64,") for s in sources)
    for title in ("Clean accuracy", "Robust accuracy vs budget", "Overestimation gap", "Ranking stability",
                  "Kept tokens, clean vs adversarial", "Reproducibility"):
        assert f"<h2>{title}" in text, title


def test_markdown_summary(report):
    md = report["markdown"].read_text()
    assert md.startswith("# robustvtc report")
    assert "## Overestimation gap (fulltoken − cage)" in md and "| eps | compressor | budget |" in md
    assert "8/255" in md and "data:image" not in md


def test_report_needs_only_the_results(campaign_dir, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(campaign_dir / "results.jsonl", copy)  # no manifest, no sidecar: still a report
    paths = write_report(copy)
    assert "Kept tokens" not in paths["html"].read_text() and paths["markdown"].is_file()


def test_extra_sections_hook(campaign_dir, tmp_path, monkeypatch):
    seen = {}

    def report_sections(records):
        seen["records"] = records
        return [("Defense cost", "Cost per defense.\n\n| defense | s/image |\n|---|---|\n| jpeg | 0.1 |"),
                ("Raw", "<p id='raw'>html</p>")]
    monkeypatch.setitem(sys.modules, "robustvtc.sanity", types.SimpleNamespace(report_sections=report_sections))
    paths = write_report(campaign_dir, tmp_path / "r")
    text = paths["html"].read_text()
    assert "<h2>Defense cost</h2>" in text and "<td>jpeg</td>" in text and "<p id='raw'>html</p>" in text
    assert "## Defense cost" in paths["markdown"].read_text()
    assert isinstance(seen["records"], pd.DataFrame) and "kept_overlap" in seen["records"]


def test_markdown_to_html_and_eps_format():
    html = markdown_to_html("# Title\nsome `code` and **bold** <x>\n\n- a\n- b\n\n| a | b |\n|---|---|\n| 1 | 2 |")
    assert "<h4>Title</h4>" in html and "<code>code</code>" in html and "<b>bold</b>" in html
    assert "&lt;x&gt;" in html and "<li>a</li><li>b</li>" in html and "<td>1</td><td>2</td>" in html
    assert format_eps(8 / 255) == "8/255" and format_eps(0.03) == "0.03" and format_eps(0) == "0"
    assert format_eps(1.0) == "1"


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium here (apt-get install -y chromium)")
def test_headless_browser_renders_the_report(report, tmp_path):
    from PIL import Image, ImageStat

    shot = tmp_path / "shot.png"
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--window-size=1200,3000", f"--screenshot={shot}", report["html"].as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    image = Image.open(shot).convert("L")
    assert image.size == (1200, 3000)
    # plots and tables drew something: far from a blank page, and dark ink on most bands of the page
    assert ImageStat.Stat(image).stddev[0] > 20
    bands = [image.crop((0, y, 1200, y + 300)) for y in range(0, 3000, 300)]
    assert sum(ImageStat.Stat(b).extrema[0][0] < 80 for b in bands) >= 8
