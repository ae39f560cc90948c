"""Token compressors behind one registry: ``get_compressor("fastervlm")``, ``list_compressors("*")``."""
from . import (  # noqa: F401  (registration)
    dart, divprune, fastervlm, fastv, pdrop, pooling, prumerge, simple, sparsevlm, tome, vispruner, visionzip,
)
from . import flowcut  # noqa: F401  (registration)
from . import hiprune  # noqa: F401  (registration)
from . import vscan  # noqa: F401  (registration)
from .base import Compressor, EncoderCompressor, InLLMCompressor, KeepPlan, PreLLMCompressor
from .registry import COMPRESSORS


def get_compressor(name: str, **kwargs) -> Compressor:
    return COMPRESSORS.get(name)(**kwargs)


def list_compressors(pattern: str = "*") -> list[str]:
    return COMPRESSORS.names(pattern)


__all__ = ["COMPRESSORS", "Compressor", "EncoderCompressor", "InLLMCompressor", "KeepPlan", "PreLLMCompressor",
           "get_compressor", "list_compressors"]
