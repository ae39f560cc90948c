"""``python -m robustvtc``: the same command line as ``robustvtc``."""
from .cli import main

main(prog_name="robustvtc")
