"""Defenses, one per file, installed as ``robustvtc.defenses``: ``get_defense("jpeg", quality=50)``.

Each declares its hook point, randomness and differentiability on the class (:mod:`.base`); pass them to
``Target(adapter, compressor, budget, defenses=[...])`` and attacks on that target adapt to them.
"""
from . import (  # noqa: F401  (registration)
    bit_depth, ensemble, gaussian_noise, jpeg, random_budget, ranking_instability, resize_pad, score_noise,
    score_smoothing, smoothing, translation_consensus,
)
from .base import (DEFENSES, HOOKS, Defense, DetectionDefense, DetectionRates, InputDefense, OutputDefense,
                   ScoreDefense, SelectionDefense, adaptive_attack_options, build_defenses, detection_rates,
                   get_defense, list_defenses)

__all__ = ["DEFENSES", "HOOKS", "Defense", "DetectionDefense", "DetectionRates", "InputDefense", "OutputDefense",
           "ScoreDefense", "SelectionDefense", "adaptive_attack_options", "build_defenses", "detection_rates",
           "get_defense", "list_defenses"]
