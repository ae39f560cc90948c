"""Reading transformers ViT-style vision towers: patch features, CLS, and the queries/keys compressors score by.

One mechanism for every tower family: a forward pre-hook on the attention module of each wanted layer
recomputes that layer's queries and keys from the (already normalised) hidden states it receives, so SDPA
stays on and a CLS attention row costs one matrix-vector product. What differs between families is a small
table, :data:`TOWERS`: whether token 0 is a CLS token, and how many other non-patch tokens follow it
(DINOv2's registers, DeiT's distillation token) -- those are neither patches nor CLS. Where the layers and
their attention modules live is found by trying :data:`LAYER_PATHS`, :data:`ATTENTION_PATHS` and
:data:`QK_NAMES` (the transformers 5 names first, then the older ones), once, when the model loads: a tower
the table does not know, or whose layers cannot be found, is refused there in one line naming its class.

:func:`load_encoder` wraps a bare vision encoder (a CLIP / SigLIP / ViT / DeiT / DINOv2 checkpoint, or a
loaded module) as a :class:`VisionEncoder` whose ``encode(pixels)`` returns the same
:class:`~robustvtc.models.base.VisualTokens` an LVLM adapter gives -- what encoder-only campaigns need.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import UserInputError
from ..images import check_pixels
from .base import LayerSignals, VisualTokens


@dataclass(frozen=True)
class TowerLayout:
    """What a tower family's token sequence holds before its patches."""

    name: str
    cls: bool  # token 0 is a CLS token
    extra: int | str = 0  # non-patch, non-CLS tokens after it: a count, or the config attribute holding it
    rerun: bool = False  # the CLIP tower that FlowCut/ToMe re-run layer by layer ("encoder_rerun")


TOWERS: dict[str, TowerLayout] = {  # vision config model_type -> layout
    "clip_vision_model": TowerLayout("CLIP", cls=True, rerun=True),
    "siglip_vision_model": TowerLayout("SigLIP", cls=False),
    "vit": TowerLayout("ViT", cls=True),
    "deit": TowerLayout("DeiT", cls=True, extra=1),  # the distillation token
    "dinov2": TowerLayout("DINOv2", cls=True),
    "dinov2_with_registers": TowerLayout("DINOv2 with registers", cls=True, extra="num_register_tokens"),
}
LAYER_PATHS = ("vision_model.encoder.layers", "encoder.layers", "encoder.layer", "layers")
ATTENTION_PATHS = ("self_attn", "attention.attention", "attention")
QK_NAMES = (("q_proj", "k_proj"), ("query", "key"))
ACCEPTED = ", ".join(dict.fromkeys(t.name for t in TOWERS.values()))


def _attr_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


class TowerReader:
    """Runs one vision tower and reads it: hidden states of every layer, and the queries/keys of chosen layers
    laid out as :class:`LayerSignals` (CLS first, then the patches; other non-patch tokens as ``extra_keys``)."""

    def __init__(self, tower: torch.nn.Module, config):
        model_type = getattr(config, "model_type", None)
        what = f"vision tower {type(tower).__name__} (model_type {model_type!r})"
        if model_type not in TOWERS:
            raise UserInputError(f"{what} is not one robustvtc can read; accepted: {ACCEPTED} towers")
        self.tower, self.layout = tower, TOWERS[model_type]
        extra = self.layout.extra
        self.num_extra = int(getattr(config, extra, 0) or 0) if isinstance(extra, str) else extra
        self.num_prefix = int(self.layout.cls) + self.num_extra  # tokens before the first patch
        self.num_layers = int(config.num_hidden_layers)
        self.patch_size = int(config.patch_size)
        self.image_size = int(config.image_size) if isinstance(config.image_size, int) else int(config.image_size[0])
        self.layers = next((found for found in (_attr_path(tower, p) for p in LAYER_PATHS)
                            if isinstance(found, torch.nn.ModuleList) and len(found) == self.num_layers), None)
        self.attention, self.qk = [], None
        for layer in self.layers or ():
            module = next((m for m in (_attr_path(layer, p) for p in ATTENTION_PATHS)
                           if m is not None and any(hasattr(m, q) for q, _ in QK_NAMES)), None)
            if module is None:
                break
            self.attention.append(module)
            self.qk = next((q, k) for q, k in QK_NAMES if hasattr(module, q) and hasattr(module, k))
        if self.layers is None or len(self.attention) != self.num_layers:
            raise UserInputError(f"{what}: its encoder layers or their query/key projections were not found "
                                 f"(tried {', '.join(LAYER_PATHS)}); accepted: {ACCEPTED} towers as transformers "
                                 "builds them")

    @property
    def has_cls(self) -> bool:
        return self.layout.cls

    @property
    def capabilities(self) -> frozenset[str]:
        return frozenset({"cls_token"} if self.has_cls else ()) | frozenset({"encoder_rerun"} if self.layout.rerun
                                                                           else ())

    def layer_index(self, layer: int) -> int:
        idx = layer + self.num_layers if layer < 0 else layer
        if not 0 <= idx < self.num_layers:
            raise UserInputError(f"encoder layer {layer} out of range; the encoder has {self.num_layers} layers")
        return idx

    def _signals(self, module, h: torch.Tensor) -> LayerSignals:
        head_dim = int(getattr(module, "head_dim", None) or module.attention_head_size)
        scale = getattr(module, "scale", None) or getattr(module, "scaling", None) or head_dim ** -0.5
        shape = (*h.shape[:-1], -1, head_dim)
        q = getattr(module, self.qk[0])(h).view(shape).transpose(1, 2)
        k = getattr(module, self.qk[1])(h).view(shape).transpose(1, 2)
        if not self.has_cls:
            return LayerSignals(q, k, float(scale))
        p = self.num_prefix
        pick = (lambda x: x) if p == 1 else (lambda x: torch.cat([x[:, :, :1], x[:, :, p:]], dim=2))
        return LayerSignals(pick(q), pick(k), float(scale), k[:, :, 1:p] if p > 1 else None)

    def run(self, pixel_values: torch.Tensor, signal_layers: Sequence[int]) -> tuple[tuple, dict[int, LayerSignals]]:
        """Normalised pixels -> (hidden states of the embeddings and every layer, {layer: signals}): the whole
        tower (:meth:`features` stops where nothing more is read)."""
        captured: dict[int, LayerSignals] = {}
        handles = self._capture(signal_layers, captured)
        try:
            out = self.tower(pixel_values=pixel_values, output_hidden_states=True)
        finally:
            for hd in handles:
                hd.remove()
        return out.hidden_states, captured

    def features(self, pixel_values: torch.Tensor, feature_layer: int,
                 signal_layers: Sequence[int] = ()) -> tuple[torch.Tensor, dict[int, LayerSignals]]:
        """Normalised pixels -> (the output of encoder layer ``feature_layer``, {layer: signals}); the tower runs
        only up to the deepest layer read -- the feature layer, or the attention input of a deeper signal layer."""
        captured: dict[int, LayerSignals] = {}
        feature = self.layer_index(feature_layer)
        deepest = max((self.layer_index(i) for i in signal_layers), default=feature)
        handles = self._capture(signal_layers, captured)
        try:
            hidden = output_of(self.tower, self.layers[feature], {"pixel_values": pixel_values},
                               self.attention[deepest] if deepest > feature else None)
        finally:
            for hd in handles:
                hd.remove()
        return hidden, captured

    def _capture(self, signal_layers: Sequence[int], captured: dict) -> list:
        """Hooks that put the queries/keys of ``signal_layers`` into ``captured`` (remove the returned handles)."""
        def make_hook(idx):
            def hook(module, args, kwargs):
                h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                captured[idx] = self._signals(module, h)
            return hook

        wanted = sorted({self.layer_index(i) for i in signal_layers})
        return [self.attention[i].register_forward_pre_hook(make_hook(i), with_kwargs=True) for i in wanted]

    def split(self, hidden: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(B, prefix + N, D) states of one layer -> (CLS or None, the other non-patch tokens, the patches)."""
        cls = hidden[:, 0] if self.has_cls else None
        return cls, hidden[:, int(self.has_cls):self.num_prefix], hidden[:, self.num_prefix:]


class _Reached(Exception):
    """Raised by a hook once a tower has computed everything that is read: the rest of its forward is skipped."""


def output_of(tower: torch.nn.Module, layer: torch.nn.Module, inputs: dict,
              stop: torch.nn.Module | None = None) -> torch.Tensor:
    """The output of ``layer`` (a module inside ``tower``) when ``tower(**inputs)`` runs, the forward cut short
    right after it -- or, with ``stop`` (a deeper module whose input hooks still read), as ``stop`` is entered.
    Nothing after the cut runs; what ran is the tower's own code (weights, SDPA, autograd graph unchanged)."""
    got: dict = {}

    def read(module, args, output):
        got["out"] = output[0] if isinstance(output, (tuple, list)) else output
        if stop is None:
            raise _Reached

    def cut(module, args, kwargs):
        raise _Reached

    handles = [layer.register_forward_hook(read)]
    if stop is not None:  # registered after the capture hooks on ``stop``, so it runs after them
        handles.append(stop.register_forward_pre_hook(cut, with_kwargs=True))
    try:
        tower(**inputs)
    except _Reached:
        pass
    finally:
        for hd in handles:
            hd.remove()
    return got["out"]


class VisionEncoder:
    """A bare vision encoder read like an LVLM's tower: ``encode(pixels)`` -> :class:`VisualTokens` of its
    feature layer (patches, CLS when it has one, queries/keys of the requested layers). Pixels are (B, 3, H, W)
    in [0, 1] at ``input_size``; normalisation happens inside, differentiably."""

    family = "encoder"

    def __init__(self, tower: torch.nn.Module, *, image_mean: Sequence[float], image_std: Sequence[float],
                 feature_layer: int = -2, name: str = "encoder"):
        self.tower = tower.eval()
        for p in self.tower.parameters():
            p.requires_grad_(False)
        self.reader = TowerReader(tower, tower.config)
        self.name = name
        n = self.reader.num_layers
        # hidden_states[layer] (LLaVA's vision_feature_layer) is the output of encoder layer (layer - 1)
        self.feature_layer = (feature_layer + n + 1 if feature_layer < 0 else feature_layer) - 1
        if not 0 <= self.feature_layer < n:
            raise UserInputError(f"feature_layer {feature_layer} selects no encoder layer of the {n}; accepted: "
                                 f"-{n}..-1 or 1..{n}")
        self.image_size = self.reader.image_size
        side = self.image_size // self.reader.patch_size
        self.grid = (side, side)
        self.num_visual_tokens = side * side
        self.capabilities = self.reader.capabilities - {"encoder_rerun"}
        param = next(self.tower.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._mean = torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.image_size, self.image_size

    def check_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return check_pixels(pixels, self.input_size)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device)
        return ((pixels - self._mean.to(pixels.device)) / self._std.to(pixels.device)).to(self.dtype)

    def encode(self, pixels: torch.Tensor, signal_layers: Sequence[int] = (), validate: bool = True) -> VisualTokens:
        if validate:
            pixels = self.check_pixels(pixels)
        hidden, captured = self.reader.features(self.normalize(pixels), self.feature_layer,
                                                (self.feature_layer, *signal_layers))
        cls, _, patches = self.reader.split(hidden)
        return VisualTokens(patches, cls, self.grid, self.feature_layer, captured, self.reader.num_layers)


_DUAL = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel"}  # image-text checkpoints: their vision half


def load_encoder(source, *, feature_layer: int = -2, device: str = "cpu", dtype: str | torch.dtype = "float32",
                 image_mean: Sequence[float] | None = None, image_std: Sequence[float] | None = None) -> VisionEncoder:
    """A :class:`VisionEncoder` from a checkpoint (local directory or cached hub id of a CLIP, SigLIP, ViT, DeiT or
    DINOv2 model: its vision encoder is loaded, a classifier head is dropped) or from a loaded tower module.
    Normalisation comes from the checkpoint's preprocessor_config.json unless given (CLIP's otherwise);
    ``feature_layer`` counts like LLaVA's ``vision_feature_layer`` (-2 = the penultimate layer's output)."""
    import transformers

    from .hf import CLIP_MEAN, CLIP_STD, read_json, resolve_dtype

    pre: dict = {}
    if isinstance(source, torch.nn.Module):
        tower, name = source, type(source).__name__
    else:
        try:
            cfg = transformers.AutoConfig.from_pretrained(str(source))
        except (OSError, ValueError) as exc:
            raise UserInputError(f"cannot load an encoder config from {source}: {str(exc).splitlines()[0]}") from None
        cls = getattr(transformers, _DUAL.get(cfg.model_type, "AutoModel"))
        if cfg.model_type not in _DUAL and cfg.model_type not in TOWERS:
            raise UserInputError(f"{source}: model_type {cfg.model_type!r} is not a vision encoder robustvtc can read;"
                                 f" accepted: {ACCEPTED} checkpoints")
        tower = cls.from_pretrained(str(source), dtype=resolve_dtype(dtype)).to(device)
        pre, name = read_json(source, "preprocessor_config.json"), str(source)
    return VisionEncoder(tower, image_mean=image_mean or pre.get("image_mean", CLIP_MEAN),
                         image_std=image_std or pre.get("image_std", CLIP_STD), feature_layer=feature_layer, name=name)
