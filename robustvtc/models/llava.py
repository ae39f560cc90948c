"""Adapter for transformers' ``LlavaForConditionalGeneration`` (LLaVA-1.5 in llava-hf format, and the built-in model).

Pipeline: pixels in [0, 1] -> CLIP normalisation -> vision tower (queries/keys of chosen layers captured by
hooks, so SDPA stays on and attention maps cost one row) -> patch features of ``vision_feature_layer``
-> [pre-LLM compressor] -> multi-modal projector -> spliced between the prompt's text embeddings ->
Llama decoder run layer by layer (an in-LLM compressor may drop visual tokens before any layer) -> logits.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from ..errors import UserInputError
from ..images import check_pixels
from .base import InLLMContext, LayerSignals, VisualTokens

if TYPE_CHECKING:
    from ..compression.base import InLLMCompressor

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
LLAVA_PROMPT = "USER: <image>\n{question} ASSISTANT:"


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserInputError(f"unknown dtype {dtype!r}; accepted: {', '.join(DTYPES)}")
    return DTYPES[dtype]


class LlavaAdapter:
    """Wraps a loaded LLaVA model + tokenizer; every stage is a method, everything differentiable w.r.t. pixels."""

    family = "llava"

    def __init__(self, model, tokenizer, *, image_mean: Sequence[float], image_std: Sequence[float],
                 image_size: int | None = None, prompt_template: str = LLAVA_PROMPT, name: str = "llava"):
        cfg = model.config
        if not isinstance(cfg.vision_feature_layer, int):
            raise UserInputError("only a single integer vision_feature_layer is supported, got "
                                 f"{cfg.vision_feature_layer!r}")
        if cfg.vision_feature_select_strategy != "default":
            raise UserInputError("only vision_feature_select_strategy='default' (CLS dropped) is supported, got "
                                 f"{cfg.vision_feature_select_strategy!r}")
        if "<image>" not in prompt_template or "{question}" not in prompt_template:
            raise UserInputError("prompt_template must contain '<image>' and '{question}'")
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.prompt_template = prompt_template
        vcfg = cfg.vision_config
        self.image_size = int(image_size or vcfg.image_size)
        self.patch_size = int(vcfg.patch_size)
        self.grid = (self.image_size // self.patch_size, self.image_size // self.patch_size)
        self.num_visual_tokens = self.grid[0] * self.grid[1]
        self.num_vision_layers = int(vcfg.num_hidden_layers)
        self.num_llm_layers = int(cfg.text_config.num_hidden_layers)
        layer = cfg.vision_feature_layer
        # hidden_states[layer] is the output of encoder layer (layer - 1) when counted from the embeddings.
        self.feature_layer = (layer + self.num_vision_layers + 1 if layer < 0 else layer) - 1
        p = next(self.model.parameters())
        self._mean = torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1)
        self.device, self.dtype = p.device, p.dtype
        self._prompt_cache: dict[str, tuple[list[int], list[int]]] = {}

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str = "cpu", dtype: str | torch.dtype = "float32",
                        prompt_template: str | None = None, name: str | None = None, **model_kwargs) -> "LlavaAdapter":
        """Load a llava-hf checkpoint (local directory or hub id); SDPA attention, nothing downloaded offline."""
        from transformers import AutoTokenizer, LlavaForConditionalGeneration
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        model = LlavaForConditionalGeneration.from_pretrained(
            str(path), dtype=resolve_dtype(dtype), attn_implementation="sdpa", **model_kwargs)
        if "device_map" not in model_kwargs:
            model = model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        pre = _read_preprocessor(Path(path)) if Path(path).is_dir() else {}
        mean = pre.get("image_mean", (0.48145466, 0.4578275, 0.40821073))
        std = pre.get("image_std", (0.26862954, 0.26130258, 0.27577711))
        template = prompt_template or pre.get("robustvtc_prompt_template") or LLAVA_PROMPT
        return cls(model, tokenizer, image_mean=mean, image_std=std, prompt_template=template, name=name or str(path))

    # ------------------------------------------------------------------ vision side
    def check_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return check_pixels(pixels, self.image_size)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        mean, std = self._mean.to(pixels.device), self._std.to(pixels.device)
        return ((pixels - mean) / std).to(self.dtype)

    def encode(self, pixels: torch.Tensor, signal_layers: Sequence[int] = (), validate: bool = True) -> VisualTokens:
        """Run the vision tower; capture queries/keys of the feature layer and of ``signal_layers``."""
        if validate:
            pixels = self.check_pixels(pixels)
        tower = self.model.model.vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers  # flattened in transformers 5
        wanted = {self.feature_layer}
        for layer in signal_layers:
            idx = layer + self.num_vision_layers if layer < 0 else layer
            if not 0 <= idx < self.num_vision_layers:
                raise UserInputError(f"encoder layer {layer} out of range; the encoder has {self.num_vision_layers} layers")
            wanted.add(idx)
        captured: dict[int, LayerSignals] = {}

        def make_hook(idx):
            def hook(module, args, kwargs):
                h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                shape = (*h.shape[:-1], -1, module.head_dim)
                q = module.q_proj(h).view(shape).transpose(1, 2)
                k = module.k_proj(h).view(shape).transpose(1, 2)
                captured[idx] = LayerSignals(q, k, float(module.scale))
            return hook

        handles = [layers[i].self_attn.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i in sorted(wanted)]
        try:
            out = tower(pixel_values=self.normalize(pixels), output_hidden_states=True)
        finally:
            for hd in handles:
                hd.remove()
        hidden = out.hidden_states[self.feature_layer + 1]
        return VisualTokens(hidden[:, 1:], hidden[:, 0], self.grid, self.feature_layer, captured, self.num_vision_layers)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Multi-modal projector: (B, K, D_vision) -> (B, K, D_llm)."""
        return self.model.model.multi_modal_projector(features)

    # ------------------------------------------------------------------ text side
    def _prompt_ids(self, question: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the single image placeholder of the formatted prompt."""
        if question not in self._prompt_cache:
            text = self.prompt_template.format(question=question)
            ids = self.tokenizer(text).input_ids
            image_id = self.model.config.image_token_index
            if ids.count(image_id) != 1:
                raise UserInputError(f"the prompt must contain exactly one image token, got {ids.count(image_id)}")
            cut = ids.index(image_id)
            self._prompt_cache[question] = (ids[:cut], ids[cut + 1:])
        return self._prompt_cache[question]

    def continuation_ids(self, question: str, answer: str) -> list[int]:
        """Ids of ``answer`` as the model would read it right after the prompt."""
        text = self.prompt_template.format(question=question)
        full = self.tokenizer(text + " " + answer).input_ids
        prompt = self.tokenizer(text).input_ids
        if full[: len(prompt)] != prompt or len(full) == len(prompt):
            raise UserInputError(f"answer {answer!r} does not tokenize as a continuation of the prompt")
        return full[len(prompt):]

    def _assemble(self, visual: Sequence[torch.Tensor], questions: Sequence[str],
                  continuations: Sequence[Sequence[int]] | None):
        """Left-padded input embeddings [prefix | visual | suffix | continuation] and their bookkeeping."""
        embed = self.model.get_input_embeddings()
        rows, vis_pos, txt_pos = [], [], []
        for b, (v, q) in enumerate(zip(visual, questions)):
            pre, suf = self._prompt_ids(q)
            cont = list(continuations[b]) if continuations is not None else []
            ids_pre = torch.tensor(pre, device=self.device)
            ids_post = torch.tensor(suf + cont, device=self.device, dtype=torch.long)
            rows.append(torch.cat([embed(ids_pre), v.to(self.dtype), embed(ids_post)], dim=0))
            vis_pos.append((len(pre), v.shape[0]))
            txt_pos.append((len(pre) + v.shape[0], len(suf)))
        length = max(r.shape[0] for r in rows)
        pads = [length - r.shape[0] for r in rows]
        embeds = torch.stack([torch.cat([r.new_zeros(pad, r.shape[1]), r]) for r, pad in zip(rows, pads)])
        mask = torch.stack([torch.arange(length, device=self.device) >= pad for pad in pads]).long()
        visual_index, visual_valid = _span_index(vis_pos, pads, self.device)
        text_index, text_valid = _span_index(txt_pos, pads, self.device)
        return embeds, mask, (visual_index if bool(visual_valid.all()) else None), (text_index, text_valid)

    def hidden_states(self, visual_embeds, questions: Sequence[str], continuations=None,
                      in_llm: "InLLMCompressor | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Final-norm hidden states (B, L, D) of the decoder and the 2-D attention mask after any in-LLM pruning."""
        visual = _as_list(visual_embeds)
        if len(visual) != len(questions):
            raise UserInputError(f"{len(visual)} images but {len(questions)} questions")
        embeds, mask, visual_index, text_index = self._assemble(visual, questions, continuations)
        return self._decode(embeds, mask, visual_index, text_index, in_llm)

    def _decode(self, embeds, mask, visual_index, text_index, in_llm):
        from transformers.masking_utils import create_causal_mask

        lm = self.model.model.language_model
        prune_at = set(in_llm.layers) if in_llm is not None else set()
        if prune_at and visual_index is None:
            raise UserInputError("in-LLM compression needs the same number of visual tokens in every sample")
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        h = embeds
        prev = None  # (input of the previous layer, its cos/sin, its 2-D mask)
        causal = cos_sin = None
        for i, layer in enumerate(lm.layers):
            if i in prune_at:
                ctx = self._in_llm_context(i, h, mask, visual_index, text_index, prev, embeds)
                keep, gain = in_llm.select(ctx)  # sorted columns of visual_index, optional relaxed gains
                h, mask, positions, visual_index, text_index = _drop_visual(
                    h, mask, positions, visual_index, text_index, keep, gain, in_llm.position_policy)
                causal = None
            if causal is None:
                causal = create_causal_mask(config=lm.config, inputs_embeds=h, attention_mask=mask,
                                            past_key_values=None, position_ids=positions)
                cos_sin = lm.rotary_emb(h, position_ids=positions)
            prev = (h, cos_sin, mask)
            h = layer(h, attention_mask=causal, position_ids=positions, position_embeddings=cos_sin)
        return lm.norm(h), mask

    def _in_llm_context(self, i, h, mask, visual_index, text_index, prev, embeds) -> InLLMContext:
        """Signals at the input of decoder layer ``i``; h has the layout of ``prev`` (nothing dropped between)."""
        lm = self.model.model.language_model
        prev_h, (cos, sin), prev_mask = prev
        previous = _RowScorer(lm.layers[i - 1], prev_h, cos, sin, prev_mask)
        current = _RowScorer(lm.layers[i], h, cos, sin, prev_mask)
        return InLLMContext(i, h, mask, visual_index, text_index[0], text_index[1], previous.rows,
                            previous.keys, embeds, current.rows, lm.norm)

    # ------------------------------------------------------------------ answers
    def logits_at(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """LM-head logits at (B, P) positions of ``hidden``: (B, P, vocab), in float32."""
        idx = positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        return self.model.lm_head(torch.gather(hidden, 1, idx)).float()

    def candidate_logprobs(self, visual_embeds, questions: Sequence[str], candidates: Sequence[str],
                           in_llm: "InLLMCompressor | None" = None) -> torch.Tensor:
        """Summed log-probability of each candidate answer: (B, C). One forward when every candidate is one token."""
        cand_ids = [self.continuation_ids(questions[0], c) for c in candidates]
        if all(len(c) == 1 for c in cand_ids):
            hidden, _ = self.hidden_states(visual_embeds, questions, in_llm=in_llm)
            last = torch.full((hidden.shape[0], 1), hidden.shape[1] - 1, device=hidden.device)
            logp = self.logits_at(hidden, last)[:, 0].log_softmax(-1)
            return logp[:, torch.tensor([c[0] for c in cand_ids], device=logp.device)]
        return torch.stack([self.sequence_logprob(visual_embeds, questions, [c] * len(questions), in_llm)
                            for c in candidates], dim=1)

    def sequence_logprob(self, visual_embeds, questions: Sequence[str], answers: Sequence[str],
                         in_llm: "InLLMCompressor | None" = None) -> torch.Tensor:
        """Teacher-forced summed log-probability of ``answers`` (one per sample): (B,)."""
        conts = [self.continuation_ids(q, a) for q, a in zip(questions, answers)]
        hidden, _ = self.hidden_states(visual_embeds, questions, conts, in_llm=in_llm)
        longest = max(len(c) for c in conts)
        L = hidden.shape[1]
        # with left padding every continuation ends at L-1; token j of a length-n answer sits at L-n+j
        pos = torch.stack([torch.arange(L - 1 - longest, L - 1, device=hidden.device)] * len(conts))
        logp = self.logits_at(hidden, pos).log_softmax(-1)  # predicts tokens at pos + 1
        total = []
        for b, c in enumerate(conts):
            target = torch.tensor(c, device=hidden.device)
            total.append(logp[b, longest - len(c):].gather(-1, target.unsqueeze(-1)).sum())
        return torch.stack(total)

    def answer_loss(self, visual_embeds, questions: Sequence[str], answers: Sequence[str],
                    in_llm: "InLLMCompressor | None" = None) -> torch.Tensor:
        """Negative log-likelihood of the given answers, per sample (B,): the white-box attack loss."""
        return -self.sequence_logprob(visual_embeds, questions, answers, in_llm)

    @torch.no_grad()
    def generate(self, visual_embeds, questions: Sequence[str], max_new_tokens: int = 8,
                 in_llm: "InLLMCompressor | None" = None) -> list[str]:
        """Greedy answers (no KV cache: the in-LLM compressor re-prunes every forward, as FastV's reference does)."""
        eos = self.tokenizer.eos_token_id
        generated: list[list[int]] = [[] for _ in questions]
        done = [False] * len(questions)
        for _ in range(max_new_tokens):
            hidden, _ = self.hidden_states(visual_embeds, questions, generated, in_llm=in_llm)
            last = torch.full((hidden.shape[0], 1), hidden.shape[1] - 1, device=hidden.device)
            nxt = self.logits_at(hidden, last)[:, 0].argmax(-1).tolist()
            for b, t in enumerate(nxt):
                if not done[b]:
                    if t == eos:
                        done[b] = True
                    else:
                        generated[b].append(t)
            if all(done):
                break
        return [self.tokenizer.decode(g, skip_special_tokens=True).strip() for g in generated]


def _as_list(visual_embeds) -> list[torch.Tensor]:
    if isinstance(visual_embeds, torch.Tensor):
        if visual_embeds.dim() != 3:
            raise UserInputError(f"visual embeddings must be (B, K, D), got {tuple(visual_embeds.shape)}")
        return list(visual_embeds.unbind(0))
    return list(visual_embeds)


def _span_index(spans: list[tuple[int, int]], pads: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, n_max) sequence positions of one span per row and a validity mask; short rows repeat their last position."""
    n_max = max(n for _, n in spans)
    index = torch.zeros(len(spans), n_max, dtype=torch.long, device=device)
    valid = torch.zeros(len(spans), n_max, dtype=torch.bool, device=device)
    for b, ((start, n), pad) in enumerate(zip(spans, pads)):
        if n:
            index[b] = (pad + start + torch.arange(n_max, device=device).clamp(max=n - 1))
            valid[b, :n] = True
    return index, valid


class _RowScorer:
    """Queries/keys of one decoder layer on its input, computed on first use: head-averaged attention rows
    of chosen queries without materialising the full attention (SDPA/FA stay usable)."""

    def __init__(self, layer, hidden, cos, sin, mask):
        self.layer, self.hidden, self.cos, self.sin, self.mask = layer, hidden, cos, sin, mask
        self._qk = None

    def _project(self):
        if self._qk is None:
            from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

            attn = self.layer.self_attn
            normed = self.layer.input_layernorm(self.hidden)
            shape = (*normed.shape[:-1], -1, attn.head_dim)
            q = attn.q_proj(normed).view(shape).transpose(1, 2)
            k = attn.k_proj(normed).view(shape).transpose(1, 2)
            self._qk = apply_rotary_pos_emb(q, k, self.cos, self.sin)
        return self._qk

    def keys(self) -> torch.Tensor:
        """(B, kv_heads, L, head_dim) keys after RoPE."""
        return self._project()[1]

    def rows(self, query_index: torch.Tensor) -> torch.Tensor:
        """(B, Q, L) head-mean causal softmax attention of the queries at ``query_index`` (B, Q)."""
        from transformers.models.llama.modeling_llama import repeat_kv

        q, k = self._project()
        attn = self.layer.self_attn
        k = repeat_kv(k, attn.num_key_value_groups)
        idx = query_index.unsqueeze(1).unsqueeze(-1).expand(-1, q.shape[1], -1, q.shape[-1])
        logits = torch.gather(q, 2, idx) @ k.transpose(-1, -2) * attn.scaling  # (B, H, Q, L)
        cols = torch.arange(k.shape[2], device=k.device)
        allowed = (cols.view(1, 1, -1) <= query_index.unsqueeze(-1)) & self.mask.bool().unsqueeze(1)
        logits = logits.float().masked_fill(~allowed.unsqueeze(1), torch.finfo(torch.float32).min)
        return logits.softmax(-1).mean(dim=1)


def _drop_visual(h, mask, positions, visual_index, text_index, keep, gain, position_policy: str):
    """Remove the visual tokens not in ``keep`` (B, K', sorted; same count per row); scale kept ones by ``gain``."""
    B, L = mask.shape
    kept_pos = torch.gather(visual_index, 1, keep)
    alive = torch.ones(B, L, dtype=torch.bool, device=h.device)
    alive.scatter_(1, visual_index, False)
    alive.scatter_(1, kept_pos, True)
    order = torch.arange(L, device=h.device).expand(B, L)
    new_len = int(alive[0].sum())
    idx = order[alive].view(B, new_len)
    h = torch.gather(h, 1, idx.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
    mask = torch.gather(mask, 1, idx)
    if position_policy == "original":
        positions = torch.gather(positions, 1, idx)
    else:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # new index of an old position = number of alive positions before it
    rank = alive.long().cumsum(-1) - 1
    visual_index = torch.gather(rank, 1, kept_pos)
    text_index = (torch.gather(rank, 1, text_index[0]), text_index[1])
    if gain is not None:
        scale = torch.ones(B, new_len, 1, dtype=h.dtype, device=h.device)
        h = h * scale.scatter(1, visual_index.unsqueeze(-1), gain.unsqueeze(-1).to(h.dtype))
    return h, mask, positions, visual_index, text_index


def _read_preprocessor(path: Path) -> dict:
    f = path / "preprocessor_config.json"
    return json.loads(f.read_text()) if f.is_file() else {}
