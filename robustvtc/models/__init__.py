"""Model loading by name: ``load_model("builtin")`` or a llava-hf directory / hub id."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserInputError
from .builtin import BUILTIN_DIR
from .llava import LlavaAdapter

BUILTIN_MODELS = {"builtin": BUILTIN_DIR}


def load_model(name: str = "builtin", *, device: str = "cpu", dtype: str = "float32", **kwargs) -> LlavaAdapter:
    """An adapter for ``name``: "builtin", a local llava-hf directory, or a hub id (cached; offline in tests)."""
    if name in BUILTIN_MODELS:
        path = BUILTIN_MODELS[name]
        if not (path / "model.safetensors").is_file():
            raise UserInputError(f"the built-in weights are missing from {path}; reinstall robustvtc or run "
                                 "`robustvtc train-builtin`")
        return LlavaAdapter.from_pretrained(path, device=device, dtype=dtype, name=name, **kwargs)
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise UserInputError(f"{local} is not a Hugging Face model directory (no config.json)")
        return _load_hf(local, device, dtype, kwargs)
    if "/" in name and not name.startswith((".", "/")):
        return _load_hf(name, device, dtype, kwargs)
    raise UserInputError(f"unknown model {name!r}; accepted: {', '.join(BUILTIN_MODELS)}, a llava-hf directory or a hub id")


def _load_hf(path, device, dtype, kwargs) -> LlavaAdapter:
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(str(path))
    except OSError as exc:
        raise UserInputError(f"cannot load model config from {path}: {str(exc).splitlines()[0]}") from None
    if cfg.model_type != "llava":
        raise UserInputError(f"model type {cfg.model_type!r} has no adapter yet; accepted: llava")
    return LlavaAdapter.from_pretrained(path, device=device, dtype=dtype, **kwargs)


def list_models() -> list[str]:
    return sorted(BUILTIN_MODELS)
