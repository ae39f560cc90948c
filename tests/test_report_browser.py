"""The report in a real browser: headless Chromium (Debian's ``chromium`` package; .ci/run installs it) loads
report.html without console errors, the verdict section is in the DOM, and the page draws at 700 px."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from robustvtc.campaign.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium on PATH (chromium, chromium-browser "
                                                         "or google-chrome); install it: apt-get install -y chromium")
EPS = 8 / 255


def _records() -> list[dict]:
    """12 samples; on visionzip@16 cage leaves 3 right, fulltoken 10; with all tokens both leave 11."""
    rows = []
    for s in range(12):
        base = {"sample": s, "qtype": "count", "steps": 2, "defense": "none", "adaptive": False, "flagged": None,
                "rank_spearman": 0.8, "rank_kendall": 0.7, "l2": 1.0, "seconds": 0.1, "budget_mapping": None}
        for comp, budget in (("none", 144), ("visionzip", 16)):
            rows.append({**base, "attack": "clean", "eps": 0.0, "compressor": comp, "budget": budget,
                         "correct": True, "clean_correct": True, "full_token_correct": True,
                         "clean_full_token_correct": True, "kept_overlap": 1.0 if comp != "none" else None,
                         "kept_disruption": 0.0 if comp != "none" else None, "linf": 0.0})
            for attack, right in (("fulltoken", s < 10), ("cage", s < 3)):
                rows.append({**base, "attack": attack, "eps": EPS, "compressor": comp, "budget": budget,
                             "correct": right if comp != "none" else s < 11, "clean_correct": True,
                             "full_token_correct": s < 11, "clean_full_token_correct": True,
                             "kept_overlap": (0.9 if attack == "fulltoken" else 0.5) if comp != "none" else None,
                             "kept_disruption": ((0.1 if attack == "fulltoken" else 0.3 + 0.01 * s)
                                                 if comp != "none" else None), "linf": EPS})
    return rows


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser")
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records()))
    manifest = {"scenario": {"name": "browser"}, "status": "complete", "model": {"name": "builtin",
                                                                              "num_visual_tokens": 144},
                "attacks": {a: {"name": a, "eps": [EPS], "params": {"steps": 2, "alpha": 1 / 255,
                                                                     "random_start": a == "fulltoken"}}
                            for a in ("fulltoken", "cage")}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return write_report(folder)["html"]


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr",
                           "--v=0", *args], capture_output=True, text=True, timeout=120)


def test_loads_without_console_errors_and_shows_the_verdict(report):
    proc = _chromium("--dump-dom", report.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Chromium logs page console messages as "...:INFO:CONSOLE:1] "Uncaught Error: ..."" (any level)
    console = [line for line in proc.stderr.splitlines() if "Uncaught" in line or ":CONSOLE" in line]
    assert not console, console
    dom = proc.stdout
    assert '<h2 id="verdict">Verdict: does full-token testing overestimate robustness?</h2>' in dom
    assert '<p class="verdict">Full-token testing overestimates robustness in 1 of 1 settings' in dom
    assert dom.count("data:image/png;base64,") >= 4 and "<h2 id=\"glossary\">Glossary</h2>" in dom


def test_draws_at_700_px(report, tmp_path):
    from PIL import Image, ImageStat

    shot = tmp_path / "shot.png"
    proc = _chromium("--hide-scrollbars", "--window-size=700,2400", f"--screenshot={shot}", report.as_uri())
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    image = Image.open(shot).convert("L")
    assert image.size == (700, 2400)
    # plots and tables drew something: far from a blank page, and dark ink on most bands of the page
    assert ImageStat.Stat(image).stddev[0] > 20
    bands = [image.crop((0, y, 700, y + 300)) for y in range(0, 2400, 300)]
    assert sum(ImageStat.Stat(b).extrema[0][0] < 80 for b in bands) >= 6
