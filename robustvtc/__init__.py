"""robustvtc: adversarial-robustness testing for LVLMs with visual-token compression."""
from pathlib import Path as _Path

_here = _Path(__file__).resolve().parent
if not (_here / "attacks").is_dir() and (_here.parent / "attacks" / "__init__.py").is_file():
    # Source checkout: make robustvtc.attacks / .defenses / .scenarios resolve to the top-level folders, so
    # `python -m pytest` works whether or not (and however) the package is installed.
    __path__.append(str(_here.parent))

__version__ = "0.1.0"

# The public API, imported on first use: `import robustvtc` (and the CLI's --help) stays free of torch.
_PUBLIC = {
    "load_model": "robustvtc.models", "list_models": "robustvtc.models", "Target": "robustvtc.target",
    "get_compressor": "robustvtc.compression", "get_attack": "robustvtc.attacks", "get_defense": "robustvtc.defenses",
    "run_campaign": "robustvtc.campaign", "load_scenario": "robustvtc.campaign", "load_records":
    "robustvtc.campaign.metrics",
}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'robustvtc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
