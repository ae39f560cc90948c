"""Attacks, one per file, installed as ``robustvtc.attacks``: ``get_attack("cage", adapter, eps="2/255")``.

Every attack declares its threat model on the class (``Attack.threat``) and runs the shared PGD loop of
:class:`~robustvtc.attacks.base.Attack`; :mod:`.bridge` runs torchattacks on an LVLM target.
"""
from . import cage, cira, fata, fulltoken, known_budget, stealth, whitebox  # noqa: F401  (registration)
from .base import (ATTACKS, Attack, AttackResult, EncoderAttack, ThreatModel, list_attacks,
                   parse_eps)
from .bridge import CandidateLogits, run_torchattack
from .cage import CAGE
from .cira import CIRA
from .fata import FATA
from .fulltoken import FullToken
from .known_budget import KnownBudget
from .stealth import Stealth
from .torchattack import torchattack_class
from .whitebox import WhiteBox


def attack_class(name: str) -> type[Attack]:
    """The class of a registered attack name, or of ``torchattacks.<Class>`` (the torchattacks namespace)."""
    if isinstance(name, str) and name.startswith("torchattacks."):
        return torchattack_class(name)
    return ATTACKS.get(name)


def get_attack(name: str, *args, **kwargs) -> Attack:
    """``get_attack("cage", adapter_or_target, eps="2/255")`` -- the class registered under ``name``
    (``torchattacks.<Class>``: that torchattacks attack through the answer scores, see :mod:`.torchattack`)."""
    return attack_class(name)(*args, **kwargs)

__all__ = ["ATTACKS", "Attack", "AttackResult", "CAGE", "CIRA", "CandidateLogits", "EncoderAttack", "FATA", "FullToken",
           "KnownBudget", "Stealth", "ThreatModel", "WhiteBox", "attack_class", "get_attack", "list_attacks", "parse_eps",
           "run_torchattack"]
