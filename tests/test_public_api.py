"""The package root re-exports the public API lazily, and ``python -m robustvtc`` is the CLI."""
import subprocess
import sys

import pytest


def test_public_api_is_importable_from_the_root_without_importing_torch_first():
    code = ("import sys, robustvtc; assert 'torch' not in sys.modules, 'import robustvtc pulled torch'; "
            "from robustvtc import (Target, get_attack, get_compressor, get_defense, load_model, load_records, "
            "load_scenario, run_campaign); print(get_compressor('visionzip').name, get_attack.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["visionzip", "robustvtc.attacks"]


def test_unknown_attribute_is_an_attribute_error():
    import robustvtc

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        robustvtc.nope  # noqa: B018


def test_python_dash_m_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "robustvtc", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("Usage: robustvtc ")
