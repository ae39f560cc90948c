"""Token compressors behind one registry: ``get_compressor("fastervlm")``, ``list_compressors("*")``."""
from ..errors import UserInputError
from ..models.base import CAPABILITIES
from . import (  # noqa: F401  (registration)
    dart, divprune, fastervlm, fastv, flowcut, hiprune, pdrop, pooling, prumerge, simple, sparsevlm, tome, vispruner,
    visionzip, vscan,
)
from .base import Compressor, EncoderCompressor, InLLMCompressor, KeepPlan, PreLLMCompressor
from .registry import COMPRESSORS

COMPRESSORS.base = Compressor  # module:Class references and entry-point plug-ins must subclass it


def get_compressor(name: str, **kwargs) -> Compressor:
    return COMPRESSORS.get(name)(**kwargs)


def list_compressors(pattern: str = "*") -> list[str]:
    return COMPRESSORS.names(pattern)


def compatible_compressors(adapter) -> list[str]:
    """Registered compressors whose requirements (CLS attention, keys, ...) the model's adapter meets."""
    return [name for name, cls in COMPRESSORS.items()
            if set(cls.requires) <= adapter.capabilities and (adapter.compressed_parts == 1 or cls.stage != "in_encoder")]


def check_compatible(adapter, compressor: Compressor, budget: int) -> None:
    """Refuse a compressor the model cannot run, in one line naming what is missing and what would work."""
    missing = [c for c in compressor.requires if c not in adapter.capabilities]
    if missing:
        raise UserInputError(
            f"compressor {compressor.name!r} needs {CAPABILITIES[missing[0]]}, which the {adapter.family} model "
            f"{adapter.name!r} does not have; compatible compressors: {', '.join(compatible_compressors(adapter))}")
    if adapter.compressed_parts > 1 and compressor.stage == "in_encoder":
        raise UserInputError(f"{compressor.name!r} merges inside the encoder, but {adapter.family} compresses each "
                             f"of its {adapter.compressed_parts} crops; compatible compressors: "
                             f"{', '.join(compatible_compressors(adapter))}")
    compressor.check_model(adapter)
    if adapter.compressed_parts > 1 and compressor.stage != "in_llm" and budget < adapter.compressed_parts:
        raise UserInputError(f"budget {budget} out of range for {compressor.name!r} on {adapter.name!r}: the budget "
                             f"is split over {adapter.compressed_parts} crops; accepted: {adapter.compressed_parts}..{adapter.num_visual_tokens}")


__all__ = ["COMPRESSORS", "Compressor", "EncoderCompressor", "InLLMCompressor", "KeepPlan", "PreLLMCompressor",
           "check_compatible", "compatible_compressors", "get_compressor", "list_compressors"]
