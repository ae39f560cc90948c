"""robustvtc: adversarial-robustness testing for LVLMs with visual-token compression."""
from pathlib import Path as _Path

_here = _Path(__file__).resolve().parent
if not (_here / "attacks").is_dir() and (_here.parent / "attacks" / "__init__.py").is_file():
    # Source checkout: make robustvtc.attacks / .defenses / .scenarios resolve to the top-level folders, so
    # `python -m pytest` works whether or not (and however) the package is installed.
    __path__.append(str(_here.parent))

__version__ = "0.1.0"
