"""Token compressors behind one registry: ``get_compressor("fastervlm")``, ``list_compressors("*")``."""
from ..errors import UserInputError
from ..models.base import CAPABILITIES
from . import (  # noqa: F401  (registration)
    dart, divprune, fastervlm, fastv, flowcut, hiprune, pdrop, pooling, prumerge, simple, sparsevlm, tokencarve, tome,
    vispruner, visionzip, vscan,
)
from .base import Compressor, EncoderCompressor, InLLMCompressor, KeepPlan, PreLLMCompressor
from .registry import COMPRESSORS

COMPRESSORS.base = Compressor  # module:Class references and entry-point plug-ins must subclass it

# Seed methods (issue 23) that are NOT registered, and why: a method is registered under a paper's name only
# where its rule is published exactly (official code or paper pseudo-code) and robustvtc can run it as
# published. `robustvtc list compressors` prints this after its table.
NOT_REGISTERED: dict[str, str] = {
    "floc": "facility-location lazy greedy (arXiv 2511.00141, video LMMs); no official code found and the "
            "paper's exact similarity (which features, normalisation, per-frame or global) could not be read",
    "llava_zip": "DFMR (arXiv 2412.08771): an image-adaptive pooling factor from patch standard deviations, so "
                 "the token count is not a budget (at a fixed budget it is plain pooling, registered as "
                 "'pooling'); used with a LLaVA fine-tuned with DFMR; no official code found",
    "vflowopt": "official code (sihany077/VFlowOpt@129eeef) targets LLaVA-OneVision/Qwen2-VL only; its pruning "
                "hyperparameters come from a per-model optimisation run (published for LLaVA-OV-7B at 10/25/50 %); "
                "it prunes inside the SigLIP tower and again in the LLM with token recycling (merging), which the "
                "in-LLM hook cannot do",
    "hidrop": "official repository (EIT-NLP/HiDrop@64c41a9) has no code yet; late injection needs a model "
              "trained for it and the layer schedule is optimised with a differentiable top-k",
    "simignore": "official code (FanshuoZeng/Simignore@0690739) scores image tokens against the embeddings of "
                 "ScienceQA answer options cut out of the prompt by marker tokens, and keeps an adaptive count "
                 "(a strided walk over sorted pairs); pre-LLM compressors get no text and the count is not a budget",
    "gsearch_psigmoid": "G-Search / P-Sigmoid (arXiv 2412.00556) are searches for per-layer keep rates "
                        "(greedy search on data; Bayesian optimisation of a sigmoid); no official code or "
                        "searched schedules found to reproduce",
    "look_m": "KV-cache compression (SUSTechBruce/LOOK-M@ecf0f51, kv_token_merge/modify_llama.py): per layer and "
              "per head, keeps the top accumulated-attention plus recent KV pairs after the prefill and merges "
              "evicted keys/values into kept ones, so it changes only decoding; robustvtc scores answers from the "
              "prefill, where LOOK-M changes nothing, and per-head KV merges are not a choice of visual tokens",
    "cdpruner": "selection rule exact in compression/cdpruner.py (Theia-4869/CDPruner@9541616), but its "
                "relevance needs the instruction text and CLIP's text tower and visual projection, which "
                "pre-LLM compressors do not get and llava-hf checkpoints do not ship",
    "holitom": "a video method (cokeshao/HoliTom: temporal segmentation and merging across frames, per-frame "
               "DPC-kNN spatial merging on SigLIP's last layer, inner-LLM merging at layer 18 for LLaVA-OneVision "
               "video); its single-image path was not separated from the video pipeline against the official "
               "code, so it is not registered under its name",
}


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


__all__ = ["COMPRESSORS", "NOT_REGISTERED", "Compressor", "EncoderCompressor", "InLLMCompressor", "KeepPlan",
           "PreLLMCompressor", "check_compatible", "compatible_compressors", "get_compressor", "list_compressors"]
