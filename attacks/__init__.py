"""Attacks, one per file, installed as ``robustvtc.attacks``."""
