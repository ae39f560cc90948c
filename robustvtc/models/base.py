"""What every LVLM adapter exposes: pixels -> visual tokens (+ importance signals) -> LLM -> answer scores.

An adapter owns the model-specific plumbing (normalisation, encoder hooks, prompt splicing, decoder
loop); compressors and attacks only see :class:`VisualTokens`, visual embeddings and these methods, so
one attack or compressor runs on every model family.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Protocol, Sequence

import torch

from ..errors import UserInputError

CAPABILITIES = {
    "cls_token": "a CLS token in the vision encoder (CLS attention and CLS hidden state)",
    "encoder_rerun": "a single-crop CLIP vision tower it can re-run layer by layer on the pixels",
    "received_attention": "the queries and keys of its vision encoder's last layer over the patches of each visual "
                          "token (the attention a token receives: VisionZip's CLS-free score in its Qwen2.5-VL port)",
}
"""What an adapter may offer and a compressor may require (``Compressor.requires``), with the words used in errors."""


@dataclass
class LayerSignals:
    """Queries and keys of one vision-encoder attention layer, index 0 = CLS (B, heads, 1+N, head_dim);
    (B, heads, N, head_dim) of the patches only for an encoder without CLS (SigLIP).

    ``extra_keys`` (B, heads, R, head_dim) are the keys of the encoder's other non-patch tokens (DINOv2's
    registers, DeiT's distillation token): they are neither patches nor CLS, so ``queries``/``keys`` leave
    them out, but every query also attends to them, so :meth:`attention_from` counts them in its softmax."""

    queries: torch.Tensor
    keys: torch.Tensor
    scale: float
    extra_keys: torch.Tensor | None = None

    def attention_from(self, query_index: int = 0) -> torch.Tensor:
        """Softmax attention row of one query token over the 1+N tokens, per head: (B, heads, 1+N) -- the
        encoder's own row, so with ``extra_keys`` it sums to less than 1 (the rest went to those tokens)."""
        q = self.queries[:, :, query_index]
        logits = torch.einsum("bhd,bhnd->bhn", q, self.keys) * self.scale
        if self.extra_keys is None:
            return logits.softmax(dim=-1)
        extra = torch.einsum("bhd,bhnd->bhn", q, self.extra_keys) * self.scale
        return torch.cat([logits, extra], dim=-1).softmax(dim=-1)[..., :logits.shape[-1]]

    def rows(self, index) -> "LayerSignals":
        """The signals of some batch rows (an index or a slice)."""
        return LayerSignals(self.queries[index], self.keys[index], self.scale,
                            None if self.extra_keys is None else self.extra_keys[index])


@dataclass
class VisualTokens:
    """Patch features of the encoder's feature layer plus the signals compressors score tokens by.

    ``features`` excludes CLS (N = grid_h * grid_w tokens in raster order); ``cls`` is the CLS hidden state
    of the same layer, None for encoders without one (Qwen2-VL, SigLIP). ``signals`` maps an absolute encoder
    layer index to its :class:`LayerSignals`. Everything is differentiable w.r.t. the pixels it came from.

    ``lead`` (B, R, D_vision), when set, holds the feature-layer states of non-patch tokens the model feeds its
    LLM before the patches (a DINOv2 tower's registers, DeiT's distillation token, CLS under LLaVA's "full"
    strategy): no compressor sees or drops them; :class:`~robustvtc.target.Target` puts them in front.

    Multi-crop images (LLaVA-NeXT, ``crops`` > 1): ``features`` hold all crops' tokens in the order the LLM
    reads them, ``crop_order[i]`` being the crop-major index ``crop * grid_h * grid_w + patch`` of token i;
    ``cls`` is (B, crops, D) and signals have one row per crop (B * crops, ...). ``grid`` is one crop's grid,
    and :meth:`crop` gives one crop as a single-crop token set (what per-crop compressors see).
    """

    features: torch.Tensor  # (B, N, D_vision)
    cls: torch.Tensor | None  # (B, D_vision); (B, crops, D_vision) when crops > 1
    grid: tuple[int, int]
    feature_layer: int  # absolute index of the encoder layer whose output ``features`` is
    signals: dict[int, LayerSignals] = field(default_factory=dict)
    num_layers: int = 0
    crops: int = 1
    crop_order: torch.Tensor | None = None  # (N,) long, set when crops > 1
    lead: torch.Tensor | None = None  # (B, R, D_vision) non-patch tokens fed to the LLM before the patches
    aux: torch.Tensor | None = None  # (B, N, ...) per-patch features a family feeds its LLM besides the tokens
    # (Qwen3-VL's DeepStack features); a keep plan merges them like the tokens (HFAdapter.attach_aux)
    # encoder patches per visual token: Qwen's 2 x 2 PatchMerger makes 4. The signals then hold N * patch_group
    # patches, token i's group at [i * patch_group, (i + 1) * patch_group) (token order, no CLS)
    patch_group: int = 1

    @property
    def batch_size(self) -> int:
        return self.features.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.features.shape[1]

    def layer_index(self, layer: int | None) -> int:
        """Absolute encoder layer index; negative values count from the end like ``hidden_states[layer]``."""
        if layer is None:
            return self.feature_layer
        return layer + self.num_layers if layer < 0 else layer

    def layer_signals(self, layer: int | None = None) -> LayerSignals:
        idx = self.layer_index(layer)
        if idx not in self.signals:
            raise UserInputError(
                f"encoder layer {idx} signals were not captured; captured layers: {sorted(self.signals)}"
            )
        return self.signals[idx]

    def _require_cls(self, what: str) -> None:
        if self.cls is None:
            raise UserInputError(f"{what} needs the vision encoder's CLS token, and this model's encoder has none; "
                                 "accepted: a score without it (score='norm', the feature norm) or a compressor "
                                 "without it (robustvtc.compression.compatible_compressors(model))")

    def _join_crops(self, per_crop: torch.Tensor) -> torch.Tensor:
        """(B * crops, heads, n, ...) per-crop values -> (B, heads, N, ...) in token order."""
        if self.crops == 1:
            return per_crop
        b = per_crop.shape[0] // self.crops
        x = per_crop.view(b, self.crops, *per_crop.shape[1:]).transpose(1, 2)
        x = x.reshape(b, x.shape[1], -1, *per_crop.shape[3:])
        return x.index_select(2, self.crop_order.to(x.device))

    def cls_attention(self, layer: int | None = None, reduce: str = "mean") -> torch.Tensor:
        """CLS->patch attention of ``layer``: (B, N) reduced over heads ("mean"/"sum"), or (B, heads, N) for "none".

        Multi-crop tokens: each crop's own CLS over that crop's patches, joined in token order."""
        self._require_cls("CLS attention")
        att = self._join_crops(self.layer_signals(layer).attention_from(0)[..., 1:])
        if reduce == "none":
            return att
        if reduce in ("mean", "sum"):
            return getattr(att, reduce)(dim=1)
        raise UserInputError(f"unknown head reduction {reduce!r}; accepted: mean, sum, none")

    def keys(self, layer: int | None = None, reduce: str = "mean") -> torch.Tensor:
        """Patch keys of ``layer`` without CLS: (B, N, head_dim) averaged over heads, or (B, heads, N, head_dim).
        With ``patch_group`` > 1 a token's key is the mean of its patches' keys (VisionZip's Qwen2.5-VL port)."""
        k = self._join_crops(self.layer_signals(layer).keys[:, :, 0 if self.cls is None else 1:])
        if self.patch_group > 1:
            k = k.reshape(*k.shape[:2], -1, self.patch_group, k.shape[-1]).mean(dim=3)
        return k.mean(dim=1) if reduce == "mean" else k

    def received_attention(self, layer: int | None = None) -> torch.Tensor:
        """(B, N) the attention each visual token receives at ``layer`` (None = the feature layer), the score
        VisionZip's official Qwen2.5-VL port ranks dominant tokens by when there is no CLS token
        (``Qwen2_5_VL/qwen2_5vl_visionzip.py``, dvlab-research/VisionZip @ 68993a3): softmax(q k^T / sqrt(d))
        of the layer's patches over the image, averaged over heads, summed over the queries (the attention each
        patch receives), then averaged over the ``patch_group`` patches of each token."""
        if self.cls is not None or self.crops > 1:
            raise UserInputError("received attention is VisionZip's score for single-crop encoders without a CLS "
                                 "token (Qwen2-VL, Qwen2.5-VL); accepted: cls_attention on this model")
        s = self.layer_signals(layer)
        q, k = s.queries.float(), s.keys.float()
        att = (torch.einsum("bhqd,bhkd->bhqk", q, k) * s.scale).softmax(dim=-1)
        received = att.mean(dim=1).sum(dim=1)  # (B, T): mean over heads, then summed over queries
        return received.reshape(received.shape[0], -1, self.patch_group).mean(dim=-1)

    def norms(self) -> torch.Tensor:
        """L2 norm of every patch feature: (B, N)."""
        return self.features.norm(dim=-1)

    def sources(self) -> torch.Tensor:
        """(B, N + 1, D) the patches then CLS -- the sources keep plans index; a zero CLS when there is none."""
        cls = self.cls if self.cls is not None else self.features.new_zeros(self.batch_size, self.features.shape[-1])
        return torch.cat([self.features, cls.unsqueeze(1)], dim=1)

    def select(self, index: torch.Tensor) -> "VisualTokens":
        """The same tokens for a subset of batch items (signals included)."""
        rows = index
        if self.crops > 1:  # signals hold one row per crop
            items = torch.arange(self.batch_size, device=self.features.device)[index].reshape(-1, 1)
            rows = (items * self.crops + torch.arange(self.crops, device=items.device)).flatten()
        return VisualTokens(
            self.features[index], None if self.cls is None else self.cls[index], self.grid, self.feature_layer,
            {k: v.rows(rows) for k, v in self.signals.items()},
            self.num_layers, self.crops, self.crop_order, None if self.lead is None else self.lead[index],
            None if self.aux is None else self.aux[index], self.patch_group,
        )

    def crop(self, c: int) -> "VisualTokens":
        """Crop ``c`` of every image as a single-crop token set (its patches in raster order, its own CLS)."""
        if self.crops == 1:
            return self
        n = self.grid[0] * self.grid[1]
        where = torch.argsort(self.crop_order)[c * n:(c + 1) * n].to(self.features.device)
        step = self.crops
        signals = {k: v.rows(slice(c, None, step)) for k, v in self.signals.items()}
        return VisualTokens(self.features[:, where], None if self.cls is None else self.cls[:, c], self.grid,
                            self.feature_layer, signals, self.num_layers)


@dataclass
class VisualEmbeds:
    """Visual embeddings as they enter the LLM, per image, with the visual token each one stands for.

    ``sources[b][i]`` is the index (0..N-1, the order of :class:`VisualTokens`) of the token whose position
    ``embeds[b][i]`` takes -- for a merged token its largest-weight source -- or -1 for a structural token
    that is no visual token and is never pruned (LLaVA-NeXT's row-end newline). Adapters whose positions
    depend on where a token came from (M-RoPE) or that insert structural tokens return this from
    ``compress``; a plain (B, N, D) tensor of all tokens in order means the uncompressed layout.
    """

    embeds: list[torch.Tensor]  # per image (L_b, D_llm)
    sources: list[torch.Tensor]  # per image (L_b,) long


@dataclass
class InLLMContext:
    """What an in-LLM compressor sees at its pruning layer (the input of decoder layer ``layer``).

    ``visual_index`` (B, K) holds the sequence positions of the visual tokens still alive; ``text_index``
    (B, T) those of the text after the image (question + assistant prompt), with ``text_valid`` marking real entries. ``attention_rows(q)`` returns
    the previous layer's head-averaged attention (B, len(q) per sample, L) from the query positions ``q``
    (B, Q) -- recomputed from that layer's queries and keys, so no eager attention is needed.
    ``current_attention_rows(q)`` is the same for layer ``layer`` itself on its input (PDrop scores with
    the layer about to run); ``final_norm`` is the decoder's final norm (DART compares normed states).
    """

    layer: int
    hidden: torch.Tensor  # (B, L, D)
    attention_mask: torch.Tensor  # (B, L), 1 = real token
    visual_index: torch.Tensor  # (B, K)
    text_index: torch.Tensor  # (B, T), short rows padded by repeating their last position
    text_valid: torch.Tensor  # (B, T) bool, False at that padding
    attention_rows: Callable[[torch.Tensor], torch.Tensor]
    previous_keys: Callable[[], torch.Tensor]  # (B, heads, L, head_dim) keys of the previous layer, after RoPE
    input_embeds: torch.Tensor  # (B, L, D) the LLM's input embeddings (SparseVLM's raters use them)
    current_attention_rows: Callable[[torch.Tensor], torch.Tensor] | None = None
    final_norm: Callable[[torch.Tensor], torch.Tensor] | None = None
    # per-forward scratch a bound hook carries from one pruning layer to the next (a multi-stage method's state,
    # e.g. SparseVLM's raters chosen once at its first layer); the hook sets it, the adapter leaves it empty
    memo: dict = field(default_factory=dict)


@dataclass
class KeepPlan:
    """Kept token k = sum_j weights[b, k, j] * source_j, sources = N patches then CLS (index N).

    ``space`` says what the sources are: "vision" (feature-layer features, merged before the projector),
    "projected" (LLM-input embeddings, merged after it) or "encoder" (the method merged inside the encoder:
    the weights are only the provenance of each kept token over the original patches and cannot be
    applied). Pure selection is one-hot rows. ``lengths`` (B,) is set only by adaptive methods whose
    kept count differs per image: rows past an item's length are zero and are not fed to the LLM.
    """

    weights: torch.Tensor  # (B, K, N + 1)
    space: str = "vision"
    lengths: torch.Tensor | None = None

    @classmethod
    def from_indices(cls, indices: torch.Tensor, num_patches: int, space: str = "vision") -> "KeepPlan":
        """One-hot plan selecting source ``indices`` (B, K) (index N = CLS)."""
        w = torch.zeros(*indices.shape, num_patches + 1, device=indices.device)
        w.scatter_(-1, indices.unsqueeze(-1), 1.0)
        return cls(w, space)

    @property
    def budget(self) -> int:
        return self.weights.shape[1]

    @property
    def num_patches(self) -> int:
        return self.weights.shape[2] - 1

    def primary_sources(self) -> torch.Tensor:
        """(B, K) the source with the largest weight in each kept token."""
        return self.weights.argmax(dim=-1)

    def kept_patch_mask(self) -> torch.Tensor:
        """(B, N) bool: patches that contribute to any kept token (for kept-token maps and overlap metrics)."""
        return (self.weights[..., : self.num_patches] > 0).any(dim=1)

    def scale_rows(self, gains: torch.Tensor | None, start: int = 0) -> "KeepPlan":
        """The plan with rows ``start : start + gains.shape[1]`` multiplied by ``gains`` (B, G); None = unchanged."""
        if gains is None:
            return self
        scale = torch.ones(self.weights.shape[:2], dtype=gains.dtype, device=gains.device)
        scale = torch.cat([scale[:, :start], gains, scale[:, start + gains.shape[1]:]], dim=1)
        return replace(self, weights=self.weights * scale.unsqueeze(-1))

    def apply(self, sources: torch.Tensor) -> torch.Tensor:
        """(B, N + 1, D) sources -> (B, K, D) kept tokens."""
        if self.space == "encoder":
            raise TypeError("an 'encoder' plan records provenance only; the merged tokens come from the encoder")
        return torch.einsum("bkn,bnd->bkd", self.weights.to(sources.dtype), sources)


def split_budget(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal counts, the first ones larger (a budget over crops, DART's
    picks over pivots)."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


class InLLMHook(Protocol):
    """What the decoder calls at its pruning layers (an in-LLM compressor bound to a budget): the adapter runs
    the layers, the hook decides which visual tokens survive."""

    layers: Sequence[int]
    position_policy: str

    def select(self, ctx: "InLLMContext") -> tuple:
        """``(keep, gain)`` or ``(keep, gain, merge)`` at ``ctx.layer``.

        ``keep`` (B, K') sorted columns of ``ctx.visual_index``: the sequence places (and, with the "original"
        position policy, the positions) of the K' visual tokens that go on; ``gain`` (B, K') optional relaxed
        weights they are scaled by. Without ``merge`` the token at place ``keep[k]`` goes on unchanged; with
        ``merge`` (B, K', K) the k-th visual token that goes on (sequence order) is the weighted sum
        ``merge[:, k] @`` the hidden states of the K visual tokens alive at the layer (a one-hot row keeps a
        token exactly; a row of several weights is a merged token)."""
