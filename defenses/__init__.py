"""Defenses, one per file, installed as ``robustvtc.defenses``."""
