"""Model loading: ``load_model("builtin")`` (or ``"builtin-deit"``), a local Hugging Face directory or a hub id.

The adapter is chosen by the checkpoint's ``config.model_type`` (:data:`ADAPTERS`): llava, llava_next, qwen2_vl,
qwen2_5_vl, qwen3_vl, qwen3_vl_moe, internvl, llava_onevision and gemma3, each with the adapter class of that name.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import UserInputError
from .builtin import BUILTIN_DEIT_DIR, BUILTIN_DIR
from .gemma3 import Gemma3Adapter
from .hf import HFAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .internvl import InternVLAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_vl import Qwen2VLAdapter, Qwen25VLAdapter
from .qwen3_vl import Qwen3VLAdapter, Qwen3VLMoeAdapter

BUILTIN_MODELS = {"builtin": BUILTIN_DIR, "builtin-deit": BUILTIN_DEIT_DIR}
ADAPTERS: dict[str, type[HFAdapter]] = {
    cls.family: cls for cls in (LlavaAdapter, LlavaNextAdapter, Qwen2VLAdapter, Qwen25VLAdapter, Qwen3VLAdapter,
                                Qwen3VLMoeAdapter, InternVLAdapter, LlavaOnevisionAdapter, Gemma3Adapter)}


def load_model(name: str = "builtin", *, device: str = "cpu", dtype: str = "float32", **kwargs) -> HFAdapter:
    """An adapter for ``name``: "builtin" (CLIP tower trained from scratch, 96 px, 144 tokens), "builtin-deit"
    (pretrained DeiT-tiny tower, 224 px, 196 tokens), a local Hugging Face directory, or a hub id (cached;
    offline in tests).

    ``kwargs`` go to the adapter's ``from_pretrained``: ``image_size``, ``prompt_template``,
    ``attn_implementation``, ``device_map`` and other transformers loading options.
    """
    _check_device(device)
    if name in BUILTIN_MODELS:
        path = BUILTIN_MODELS[name]
        if not (path / "model.safetensors").is_file():
            raise UserInputError(f"the built-in weights are missing from {path}; reinstall robustvtc")
        return _loading(path, lambda: LlavaAdapter.from_pretrained(path, device=device, dtype=dtype, name=name,
                                                                   **kwargs), kwargs)
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise UserInputError(f"{local} is not a Hugging Face model directory (no config.json)")
        return _loading(local, lambda: _load_hf(local, device, dtype, kwargs), kwargs)
    if "/" in name and not name.startswith((".", "/")):
        return _loading(name, lambda: _load_hf(name, device, dtype, kwargs), kwargs)
    raise UserInputError(f"unknown model {name!r}; accepted: {', '.join(BUILTIN_MODELS)}, a Hugging Face model "
                         f"directory or hub id of type {', '.join(ADAPTERS)}")


def _check_device(device: str) -> None:
    """A device torch knows and this machine has (``cuda`` without CUDA is one line, not an AssertionError)."""
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError, TypeError):
        raise UserInputError(f"device {device!r} is not a device; accepted: cpu, cuda, cuda:N or mps") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"device {device!r}: this torch has no usable CUDA GPU; accepted: cpu (or install a CUDA "
                             "build of torch on a machine with a GPU)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserInputError(f"device {device!r}: MPS is not available here; accepted: cpu")


def _loading(where, load, kwargs: dict):
    """Run ``load``; a bad keyword (model_kwargs) or missing weights become one line naming the model."""
    try:
        return load()
    except UserInputError:
        raise
    except TypeError as exc:
        if not kwargs:
            raise
        raise UserInputError(f"model_kwargs: {str(exc).splitlines()[0]}; accepted: image_size, prompt_template, "
                             "attn_implementation, device_map and other transformers from_pretrained options") from None
    except OSError as exc:
        raise UserInputError(f"cannot load the model from {where}: {str(exc).splitlines()[0]}; accepted: a "
                             "Hugging Face model directory with config.json and its weights") from None


def _load_hf(path, device, dtype, kwargs) -> HFAdapter:
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise UserInputError(f"cannot load model config from {path}: {str(exc).splitlines()[0]}") from None
    if cfg.model_type not in ADAPTERS:
        raise UserInputError(f"model type {cfg.model_type!r} has no adapter; accepted: {', '.join(ADAPTERS)}")
    return ADAPTERS[cfg.model_type].from_pretrained(path, device=device, dtype=dtype, **kwargs)


def list_models() -> list[str]:
    return sorted(BUILTIN_MODELS)


__all__ = ["ADAPTERS", "Gemma3Adapter", "HFAdapter", "InternVLAdapter", "LlavaAdapter", "LlavaNextAdapter",
           "LlavaOnevisionAdapter", "Qwen25VLAdapter", "Qwen2VLAdapter", "Qwen3VLAdapter", "Qwen3VLMoeAdapter",
           "list_models", "load_model"]
