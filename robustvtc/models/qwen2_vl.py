"""Adapters for transformers' ``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration``.

Pixel space: one fixed (H, W), multiples of patch x merge (28 px for the released models; default 16 x 16
merged tokens, 448 x 448). Qwen2-VL picks a resolution per image (``min_pixels``/``max_pixels``); a fixed one
gives attacks a fixed token count N = (H / 28) * (W / 28). Inside the adapter, in torch: normalisation,
then the processor's patchify -- 14 x 14 patches, each repeated over the 2 temporal frames of a still image,
ordered by 2 x 2 merge groups -- and the vision tower with ``image_grid_thw = (1, H / 14, W / 14)``.

Visual tokens are the PatchMerger's outputs (the LLM-input embeddings, in raster order over the merged
grid; Qwen2.5-VL's window reordering is undone by the tower itself), so the projector is the identity.
There is no CLS token: CLS-attention compressors (FasterVLM, VisionZip, VisPruner, PruMerge) and ToMe are
refused; selection, pooling, diversity and in-LLM methods apply, and so does ``visionzip_qwen``, VisionZip's
official CLS-free port: ``encode`` captures the queries and keys (after RoPE) of the last vision block, per
image, in raster order of merged tokens with each token's 2 x 2 patches together (Qwen2.5-VL's window order
undone), so that :meth:`~robustvtc.models.base.VisualTokens.received_attention` and ``keys`` give the port's
score and merge keys (capability ``received_attention``).

Positions: 3-D M-RoPE ids (temporal, height, width) computed on the unpruned layout -- text before the image
0..P-1, the image's token at merged cell (r, c) gets (P, P + r, P + c), text after it continues from
P + max(grid) -- then sliced: a kept (or merged) token keeps the ids of its main source, text after the
image keeps its ids. In-LLM methods that renumber positions contiguously on LLaMA (PDrop, SparseVLM) keep
the sliced M-RoPE ids here: contiguous renumbering has no 3-D counterpart.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import UserInputError
from .base import LayerSignals, VisualEmbeds, VisualTokens
from .hf import CLIP_MEAN, CLIP_STD, HFAdapter, batch_rows

QWEN_PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
               "<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n")
DEFAULT_GRID = 16  # merged tokens per side when no image_size is given


class Qwen2VLAdapter(HFAdapter):
    family = "qwen2_vl"
    hf_class = "Qwen2VLForConditionalGeneration"
    default_prompt = QWEN_PROMPT
    default_placeholder = "<|image_pad|>"
    capabilities = frozenset({"received_attention"})

    def __init__(self, model, tokenizer, *, image_mean: Sequence[float] = CLIP_MEAN,
                 image_std: Sequence[float] = CLIP_STD, image_size: int | tuple[int, int] | None = None,
                 prompt_template: str | None = None, name: str | None = None, prompt_source: str = "argument"):
        super().__init__(model, tokenizer, image_mean=image_mean, image_std=image_std, prompt_template=prompt_template,
                         name=name, prompt_source=prompt_source)
        vcfg = model.config.vision_config
        self.patch_size, self.merge = int(vcfg.patch_size), int(vcfg.spatial_merge_size)
        self.temporal_patch_size = int(vcfg.temporal_patch_size)
        unit = self.patch_size * self.merge
        if image_size is None:
            image_size = DEFAULT_GRID * unit
        size = (int(image_size),) * 2 if isinstance(image_size, int) else tuple(int(v) for v in image_size)
        if len(size) != 2 or min(size) < unit or size[0] % unit or size[1] % unit:
            raise UserInputError(f"image_size {image_size!r} must be (H, W) multiples of {unit} (patch "
                                 f"{self.patch_size} x merge {self.merge}); e.g. {DEFAULT_GRID * unit}")
        self.image_size = size
        self.grid = (size[0] // unit, size[1] // unit)
        self.num_visual_tokens = self.grid[0] * self.grid[1]
        self.num_vision_layers = int(vcfg.depth)
        self.feature_layer = self.num_vision_layers - 1

    @property
    def input_size(self) -> tuple[int, int]:
        return self.image_size

    def describe_input(self) -> str:
        h, w = self.image_size
        p, t = self.patch_size, self.temporal_patch_size
        return (f"{h}x{w} image, normalised, {h // p}x{w // p} patches of {p}x{p} (x{t} temporal copies), "
                f"merged {self.merge}x{self.merge} into {self.grid[0]}x{self.grid[1]} tokens")

    # ------------------------------------------------------------------ vision side
    def patchify(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised (B, 3, H, W) -> the processor's flattened patches (B * h * w, 3 * t * p * p), in merge-group
        order: per image, per merged cell (raster), its merge x merge patches (raster), each (channel, frame, y, x)."""
        b, c = pixels.shape[:2]
        p, m, t = self.patch_size, self.merge, self.temporal_patch_size
        gh, gw = self.grid
        x = pixels.reshape(b, c, gh, m, p, gw, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)  # b, gh, gw, m, m, c, p, p
        x = x.unsqueeze(6).expand(*x.shape[:6], t, p, p)  # a still image fills every temporal frame
        return x.reshape(b * gh * gw * m * m, c * t * p * p)

    def encode(self, pixels: torch.Tensor, signal_layers: Sequence[int] = (), validate: bool = True) -> VisualTokens:
        """The vision tower's merged tokens (B, N, D_llm); no CLS. The last block's queries and keys are captured
        (``signals[feature_layer]``, ``patch_group`` = merge**2 patches per token); other layers are not."""
        if any(self._layer(layer) != self.feature_layer for layer in signal_layers):
            raise UserInputError(f"the {self.family} vision encoder has no CLS token; only its last layer's queries "
                                 f"and keys are captured (received attention); accepted: signal_layers=() or "
                                 f"({self.feature_layer},)")
        if validate:
            pixels = self.check_pixels(pixels)
        b = pixels.shape[0]
        gh, gw = self.grid
        thw = torch.tensor([[1, gh * self.merge, gw * self.merge]] * b, device=pixels.device)
        visual = self.model.model.visual
        attn = visual.blocks[self.feature_layer].attn
        seen: dict = {}
        hooks = [attn.register_forward_pre_hook(lambda m, a, kw: seen.update(kw=kw), with_kwargs=True),
                 attn.qkv.register_forward_hook(lambda m, a, out: seen.update(qkv=out))]
        try:
            out = visual(self.patchify(self.normalize(pixels)), grid_thw=thw)
        finally:
            for h in hooks:
                h.remove()
        features = out.pooler_output.reshape(b, self.num_visual_tokens, -1)
        signals = {self.feature_layer: self._last_layer_signals(seen, attn, b, thw[:1])}
        return VisualTokens(features, None, self.grid, self.feature_layer, signals, self.num_vision_layers,
                            patch_group=self.merge ** 2)

    def _layer(self, layer: int) -> int:
        return layer + self.num_vision_layers if layer < 0 else layer

    def _window_index(self, thw: torch.Tensor) -> torch.Tensor | None:
        """Qwen2.5-VL's order of merged tokens inside its vision blocks (windows), None for Qwen2-VL."""
        return None

    def _last_layer_signals(self, seen: dict, attn, b: int, thw: torch.Tensor) -> LayerSignals:
        """Queries and keys (after the vision RoPE) of the captured block, (B, heads, T, d) per image, merged
        tokens in raster order with each token's patches together (the order the merger reads them)."""
        import importlib

        rope = importlib.import_module(type(attn).__module__).apply_rotary_pos_emb_vision
        qkv = seen["qkv"]
        heads = attn.num_heads
        q, k, _ = qkv.reshape(qkv.shape[0], 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = seen["kw"]["position_embeddings"]
        q, k = rope(q, k, cos, sin)  # (T_all, heads, d)
        group = self.merge ** 2
        t = q.shape[0] // b
        q, k = q.reshape(b, t, heads, -1), k.reshape(b, t, heads, -1)
        order = self._window_index(thw)
        if order is not None:  # window order -> raster order of merged tokens, per image
            back = torch.argsort(order.to(q.device))
            q = q.reshape(b, t // group, group, heads, -1)[:, back].reshape(b, t, heads, -1)
            k = k.reshape(b, t // group, group, heads, -1)[:, back].reshape(b, t, heads, -1)
        return LayerSignals(q.transpose(1, 2), k.transpose(1, 2), q.shape[-1] ** -0.5)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Identity: the PatchMerger (Qwen's projector) already ran inside ``encode``."""
        return features

    # ------------------------------------------------------------------ layout and positions
    def lay_out(self, parts):
        """The compressor's kept tokens, each tagged with its main source so that it keeps that token's M-RoPE ids."""
        kept, plan = super().lay_out(parts)
        rows = batch_rows(kept)
        main = plan.primary_sources()
        return VisualEmbeds(rows, [main[b, :r.shape[0]] for b, r in enumerate(rows)]), plan

    def _plain_layout(self, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if visual.shape[0] != self.num_visual_tokens:
            raise UserInputError(f"{self.family} positions need to know where each token came from: a plain tensor "
                                 f"must hold all {self.num_visual_tokens} tokens, got {visual.shape[0]}; compressed "
                                 "tokens come from Target.forward")
        return super()._plain_layout(visual)

    def _positions(self, mask: torch.Tensor, rows: VisualEmbeds, questions: Sequence[str]) -> torch.Tensor:
        """(3, B, L) M-RoPE ids of the unpruned layout, sliced to the tokens present; 0 at left padding."""
        B, L = mask.shape
        width, extent = self.grid[1], max(self.grid)
        positions = torch.zeros(3, B, L, dtype=torch.long, device=mask.device)
        for b, (src, q) in enumerate(zip(rows.sources, questions)):
            before = len(self._prompt_ids(q)[0])
            real = int(mask[b].sum())
            after = real - before - src.numel()
            src = src.to(mask.device)
            positions[:, b, L - real:] = torch.cat([
                torch.arange(before, device=mask.device).expand(3, -1),
                torch.stack([torch.full_like(src, before), before + src // width, before + src % width]),
                (before + extent + torch.arange(after, device=mask.device)).expand(3, -1)], dim=1)
        return positions

    def _renumber(self, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return positions


class Qwen25VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: the same interface; its vision tower's window attention and RMSNorm are internal to it."""

    family = "qwen2_5_vl"
    hf_class = "Qwen2_5_VLForConditionalGeneration"

    def _window_index(self, thw: torch.Tensor) -> torch.Tensor:
        visual = self.model.model.visual
        if hasattr(visual, "get_window_index"):  # transformers < 5.x
            return visual.get_window_index(thw)[0]
        from transformers.vision_utils import get_vision_window_index

        return get_vision_window_index(thw, spatial_merge_size=visual.spatial_merge_size,
                                       window_size=visual.window_size, patch_size=visual.patch_size)[0]
