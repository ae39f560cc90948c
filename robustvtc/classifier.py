"""Image classifiers that reduce their tokens inside the encoder: the same security question as the LVLMs' (does
a full-token attack overestimate the robustness of a compressed model?) on a transformers ViT / DeiT classifier.

    from robustvtc.classifier import ViTClassifier, attack_table

    clf = ViTClassifier.from_pretrained("facebook/deit-tiny-patch16-224")   # or a local directory, offline
    logits = clf.logits(pixels, method="evit", budget=16)                  # pixels (B, 3, 224, 224) in [0, 1]
    preds = clf.predict(pixels)                                             # full tokens
    rows = attack_table(clf, pixels, attacks=["fulltoken", "cage"], methods=["evit", "tome", "random"],
                        budgets=[8, 16, 32, 64], eps="4/255", labels=None)

Token reduction inside the encoder (``method``; ``budget`` = patch tokens left after the last reduction, of
N = 196 for a 224 px / 16 px model):

* ``"none"``: the checkpoint's own forward (all N patches);
* ``"evit"`` -- EViT (Liang et al., "Not All Patches are What You Need", ICLR 2022; youweiliang/evit): at the
  reduction layers (default 3, 6, 9, EViT's 4th / 7th / 10th blocks), after the attention residual and before
  the MLP, keep the top-k non-CLS tokens by that layer's CLS attention (mean over heads) and, with ``fuse``
  (EViT's default), fuse the others into one token weighted by their CLS attention; a fused token takes part
  in later selections like any other. Keep counts shrink geometrically, k_s = round(N (K/N)^(s/S)), the last
  one K (EViT's one keep rate per location); with ``fuse`` the encoder ends with K + 1 non-CLS tokens;
* ``"tome"`` -- ToMe (Bolya et al., ICLR 2023) in every layer: bipartite soft matching on the head-mean keys,
  CLS protected, size-weighted merges, proportional attention; the N - K removals spread over the layers as
  :func:`robustvtc.compression.tome.merge_schedule` does (at most half the tokens per layer);
* ``"random"``: at the EViT layers, a uniformly random k_s of the tokens (no fusion), from ``seed``.

Attacks: a ``ViTClassifier`` is an encoder adapter for :mod:`robustvtc.attacks`' grey-box encoder attacks
(``fulltoken``, ``cage``): ``encode`` gives the visual tokens of ``feature_layer`` (default: the first EViT
layer, whose CLS attention the first reduction ranks by) with their attention signals, so an attack crafted
once per image is evaluated on every method x budget, as in a campaign. Metrics (:func:`attack_table`):
top-1 agreement with the clean full-token prediction and, given labels, accuracy; 95 % Clopper-Pearson
intervals and the paired fulltoken - cage gap (Newcombe) from :mod:`robustvtc.stats`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import UserInputError

METHODS = ("none", "evit", "tome", "random")
EVIT_LAYERS = (3, 6, 9)


@dataclass
class _State:
    x: torch.Tensor  # (B, T, D), CLS first
    size: torch.Tensor | None = None  # (B, T, 1) ToMe token sizes


class ViTClassifier:
    """A transformers ``ViTForImageClassification`` (ViT, DeiT in ViT format) with token reduction inside its encoder.

    Pixels are (B, 3, H, W) in [0, 1] at the model's resolution; normalisation (the checkpoint's
    preprocessor mean / std) happens inside, differentiably. ``feature_layer``: the 0-based encoder layer whose
    output attacks read (default: the first EViT layer)."""

    family = "vit_classifier"
    compressed_parts = 1

    def __init__(self, model, *, image_mean: Sequence[float] = (0.5, 0.5, 0.5),
                 image_std: Sequence[float] = (0.5, 0.5, 0.5), feature_layer: int = EVIT_LAYERS[0],
                 name: str = "vit"):
        from .models.towers import VisionEncoder

        if not hasattr(model, "vit") or not hasattr(model, "classifier"):
            raise UserInputError(f"ViTClassifier needs a transformers ViTForImageClassification, got "
                                 f"{type(model).__name__}")
        self.model = model.eval().requires_grad_(False)
        self.vit = model.vit
        self.layers = list(self.vit.layers)
        self.num_layers = len(self.layers)
        if not 0 <= feature_layer < self.num_layers:
            raise UserInputError(f"feature_layer {feature_layer} out of range; accepted: 0..{self.num_layers - 1}")
        # the attacks' view of the encoder: hidden_states[feature_layer + 1] = the output of layer feature_layer
        self.encoder = VisionEncoder(self.vit, image_mean=image_mean, image_std=image_std,
                                     feature_layer=feature_layer + 1, name=name)
        self.name = name
        self.image_size = self.encoder.image_size
        self.grid = self.encoder.grid
        self.num_visual_tokens = self.encoder.num_visual_tokens
        self.capabilities = self.encoder.capabilities
        self.feature_layer = self.encoder.feature_layer
        self.labels = [model.config.id2label[i] for i in range(len(model.config.id2label))] \
            if getattr(model.config, "id2label", None) else None

    @classmethod
    def from_pretrained(cls, source: str, *, device: str = "cpu", dtype: str = "float32",
                        feature_layer: int = EVIT_LAYERS[0]) -> "ViTClassifier":
        """Load a local directory (or cached hub id) holding a ``ViTForImageClassification`` checkpoint."""
        import transformers

        from .models.hf import read_json, resolve_dtype

        try:
            model = transformers.ViTForImageClassification.from_pretrained(str(source), dtype=resolve_dtype(dtype))
        except (OSError, ValueError) as exc:
            raise UserInputError(f"cannot load a ViT classifier from {source}: {str(exc).splitlines()[0]}") from None
        pre = read_json(source, "preprocessor_config.json") or {}
        return cls(model.to(device), image_mean=pre.get("image_mean", (0.5, 0.5, 0.5)),
                   image_std=pre.get("image_std", (0.5, 0.5, 0.5)), feature_layer=feature_layer, name=str(source))

    # ------------------------------------------------------------------ the adapter protocol attacks use
    @property
    def input_size(self) -> tuple[int, int]:
        return self.encoder.input_size

    def check_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder.check_pixels(pixels)

    def encode(self, pixels: torch.Tensor, signal_layers: Sequence[int] = (), validate: bool = True):
        """:class:`~robustvtc.models.base.VisualTokens` of ``feature_layer`` (patches, CLS, attention signals)."""
        return self.encoder.encode(pixels, signal_layers, validate)

    # ------------------------------------------------------------------ classification
    def logits(self, pixels: torch.Tensor, method: str = "none", budget: int | None = None, *,
               layers: Sequence[int] = EVIT_LAYERS, fuse: bool = True, seed: int = 0) -> torch.Tensor:
        """(B, classes) logits with ``method`` reducing the patch tokens to ``budget`` inside the encoder."""
        if method not in METHODS:
            raise UserInputError(f"unknown token reduction {method!r}; accepted: {', '.join(METHODS)}")
        pixels = self.check_pixels(pixels)
        n = self.num_visual_tokens
        budget = n if budget is None else budget
        if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= n:
            raise UserInputError(f"budget {budget!r} out of range; accepted: 1..{n} (the model's patch tokens)")
        if method == "none" or budget == n and method != "tome":
            return self.model(self.encoder.normalize(pixels)).logits
        x = self.vit.embeddings(self.encoder.normalize(pixels))
        if x.shape[1] != n + 1:
            raise UserInputError(f"{self.name}: {x.shape[1] - n} non-patch tokens; accepted: CLS only (ViT format)")
        state = _State(x)
        if method == "tome":
            from .compression.tome import bipartite_soft_matching, merge_schedule

            schedule = merge_schedule(n, budget, self.num_layers)
            state.size = torch.ones(*x.shape[:2], 1, dtype=x.dtype, device=x.device)
            for layer, r in zip(self.layers, schedule):
                attn, keys = self._attention(layer, state)
                state.x = state.x + attn
                if r:
                    merge = bipartite_soft_matching(keys, r)
                    state.x = merge(state.x * state.size)
                    state.size = merge(state.size)
                    state.x = state.x / state.size
                state.x = state.x + layer.mlp(layer.layernorm_after(state.x))
        else:
            counts = self.keep_counts(budget, len(layers), n)
            stages = dict(zip(layers, counts))
            bad = [lay for lay in stages if not 0 <= lay < self.num_layers]
            if bad:
                raise UserInputError(f"reduction layer {bad[0]} out of range; accepted: 0..{self.num_layers - 1}")
            gen = torch.Generator().manual_seed(seed)
            for index, layer in enumerate(self.layers):
                attn, cls_attn = self._attention(layer, state, cls_row=index in stages)
                state.x = state.x + attn
                if index in stages:
                    state.x = self._reduce(state.x, cls_attn, stages[index], method, fuse, gen)
                state.x = state.x + layer.mlp(layer.layernorm_after(state.x))
        return self.model.classifier(self.vit.layernorm(state.x)[:, 0])

    @staticmethod
    def keep_counts(budget: int, stages: int, num_tokens: int = 196) -> list[int]:
        """Tokens kept at each of ``stages`` reductions: round(N (K/N)^(s/S)), the last exactly K."""
        rate = (budget / num_tokens) ** (1 / stages)
        counts = [max(budget, round(num_tokens * rate ** s)) for s in range(1, stages)] + [budget]
        return counts

    def _attention(self, layer, state: _State, cls_row: bool = False):
        """(attention output after o_proj, and head-mean keys (ToMe) or head-mean CLS attention row (EViT))."""
        att = layer.attention
        h = layer.layernorm_before(state.x)
        b, t, _ = h.shape
        shape = (b, t, -1, att.head_dim)
        q, k, v = (proj(h).view(shape).transpose(1, 2) for proj in (att.q_proj, att.k_proj, att.v_proj))
        logits = (q @ k.transpose(-1, -2)) * att.scaling
        if state.size is not None:  # ToMe's proportional attention
            logits = logits + state.size.log().view(b, 1, 1, t)
        weights = logits.softmax(dim=-1)
        out = att.o_proj((weights @ v).transpose(1, 2).reshape(b, t, -1))
        if state.size is not None:
            return out, k.mean(dim=1)
        return out, weights[:, :, 0, 1:].mean(dim=1) if cls_row else None

    @staticmethod
    def _reduce(x: torch.Tensor, cls_attn: torch.Tensor, keep: int, method: str, fuse: bool,
                gen: torch.Generator) -> torch.Tensor:
        """EViT's token reorganisation (or a random subset): [CLS, kept (k), fused (1, with ``fuse``)]."""
        b, t, c = x.shape
        others = x[:, 1:]
        keep = min(keep, t - 1)
        if method == "evit":
            idx = cls_attn.detach().topk(keep, dim=1, largest=True, sorted=True).indices
        else:
            idx = torch.rand(b, t - 1, generator=gen).argsort(dim=1)[:, :keep].sort(dim=1).values.to(x.device)
        kept = others.gather(1, idx.unsqueeze(-1).expand(-1, -1, c))
        parts = [x[:, :1], kept]
        if method == "evit" and fuse and keep < t - 1:
            mask = torch.ones(b, t - 1, dtype=torch.bool, device=x.device).scatter(1, idx, False)
            compl = torch.arange(t - 1, device=x.device).expand(b, -1)[mask].view(b, -1)
            rest = others.gather(1, compl.unsqueeze(-1).expand(-1, -1, c))
            parts.append((rest * cls_attn.gather(1, compl).unsqueeze(-1)).sum(dim=1, keepdim=True))
        return torch.cat(parts, dim=1)

    @torch.no_grad()
    def predict(self, pixels: torch.Tensor, method: str = "none", budget: int | None = None, **kwargs) -> torch.Tensor:
        """(B,) top-1 class indices."""
        return self.logits(pixels, method, budget, **kwargs).argmax(dim=-1)


# ---------------------------------------------------------------------------------------------- attack table
def attack_table(clf: ViTClassifier, pixels: torch.Tensor, *, attacks: Sequence[str] = ("fulltoken", "cage"),
                 methods: Sequence[str] = ("evit", "tome", "random"), budgets: Sequence[int] = (8, 16, 32, 64),
                 eps: str | float = "4/255", steps: int = 10, labels: Sequence[int] | None = None,
                 batch_size: int = 16, seed: int = 0, attack_options: dict | None = None) -> list[dict]:
    """One row per attack (and "clean") x method x budget (and the full-token model): agreement with the clean
    full-token top-1 and, with ``labels``, accuracy, each with a 95 % Clopper-Pearson interval; the per-image
    outcomes are kept under ``agree_list`` for paired comparisons (:func:`paired_gaps`). Every attack runs the
    same schedule (``steps``, alpha = eps/4, random start, ``seed``), crafted once per image against the encoder
    (grey-box) and evaluated on every cell."""
    from .attacks import get_attack
    from .stats import clopper_pearson

    cells = [("none", clf.num_visual_tokens)] + [(m, k) for m in methods for k in budgets]
    opts = {"eps": eps, "steps": steps, "alpha": None, "random_start": True, "seed": seed, **(attack_options or {})}
    outcomes: dict[tuple, list[int]] = {}
    correct: dict[tuple, list[int]] = {}
    for start in range(0, pixels.shape[0], batch_size):
        batch = pixels[start:start + batch_size]
        reference = clf.predict(batch)
        images = {"clean": batch}
        for name in attacks:
            images[name] = get_attack(name, clf, **opts)(batch).adv.detach()
        for label, imgs in images.items():
            for method, k in cells:
                pred = clf.predict(imgs, method, k, seed=seed)
                outcomes.setdefault((label, method, k), []).extend((pred == reference).int().tolist())
                if labels is not None:
                    truth = torch.as_tensor(labels[start:start + batch_size])
                    correct.setdefault((label, method, k), []).extend((pred.cpu() == truth).int().tolist())
    rows = []
    for (label, method, k), agree in outcomes.items():
        lo, hi = clopper_pearson(sum(agree), len(agree))
        row = {"attack": label, "method": method, "budget": k, "n": len(agree),
               "agreement": sum(agree) / len(agree), "agreement_ci": (lo, hi), "agree_list": agree}
        if labels is not None:
            right = correct[(label, method, k)]
            row.update(accuracy=sum(right) / len(right), accuracy_ci=clopper_pearson(sum(right), len(right)))
        rows.append(row)
    return rows


def paired_gaps(rows: list[dict], baseline: str = "fulltoken", aligned: str = "cage") -> list[dict]:
    """Per method x budget: agreement under ``baseline`` minus under ``aligned`` (positive = the aligned attack
    does more harm, i.e. full-token testing overestimates robustness), Newcombe 95 % interval, McNemar p."""
    from .stats import PairedCounts, mcnemar_exact, paired_difference_ci

    by = {(r["attack"], r["method"], r["budget"]): r for r in rows}
    out = []
    for (attack, method, k), r in by.items():
        if attack != baseline or (aligned, method, k) not in by:
            continue
        counts = PairedCounts.of(r["agree_list"], by[(aligned, method, k)]["agree_list"])
        out.append({"method": method, "budget": k, "gap": counts.difference,
                    "gap_ci": paired_difference_ci(counts), "p": mcnemar_exact(counts)})
    return out

