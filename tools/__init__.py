"""Repository tools, not installed with robustvtc: the built-in models' training recipes, their experiments
and tests. Run from the repository root, e.g. ``python -m tools.train_builtin --help``."""
