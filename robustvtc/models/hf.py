"""What every transformers LVLM adapter shares, whatever its vision side.

A family adapter (LLaVA, LLaVA-NeXT, Qwen2-VL) supplies how pixels become :class:`VisualTokens`
(``encode``), its projector (``project``), how a compressor's output is laid out for the LLM
(``compress``, ``_plain_layout``) and the LLM positions of a layout (``_positions``, ``_renumber``).
:class:`HFAdapter` owns the rest: loading (dtype, device, ``device_map``), the prompt (chat template),
splicing visual embeddings between the prompt's text embeddings with left padding, the decoder run layer
by layer with in-LLM pruning (each layer with the mask and RoPE of its type: full or sliding-window attention,
the image's tokens attending both ways where the family does so, as Gemma 3), answer scoring and greedy
generation -- one code path for every family.
"""
from __future__ import annotations

import functools
import inspect
import json
import sys
from pathlib import Path
from typing import ClassVar, Sequence

import torch

from ..errors import UserInputError
from ..images import check_pixels
from .base import InLLMContext, InLLMHook, KeepPlan, VisualEmbeds, VisualTokens
from .preprocess import fit_image


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_QUESTION_SLOT = "ROBUSTVTCQUESTIONSLOT"  # stands for the question while a chat template renders


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserInputError(f"unknown dtype {dtype!r}; accepted: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def model_file(path: str | Path, filename: str) -> Path | None:
    """``filename`` of a local model directory or of a hub repo already in the cache; None when absent."""
    from transformers.utils import cached_file

    found = cached_file(str(path), filename, _raise_exceptions_for_missing_entries=False,
                        _raise_exceptions_for_connection_errors=False)
    return Path(found) if found else None


def read_json(path: str | Path, filename: str) -> dict:
    f = model_file(path, filename)
    return json.loads(f.read_text()) if f else {}


def chat_template_prompt(tokenizer, template: str | None, placeholder: str) -> str | None:
    """A one-image, one-question user turn rendered by ``template`` (+ generation prompt), as a format string
    with ``{question}``; None when the template does not render exactly one image placeholder."""
    from jinja2 import TemplateError

    if not template or tokenizer is None:
        return None
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _QUESTION_SLOT}]}]
    try:
        text = tokenizer.apply_chat_template(turn, chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
    except (TemplateError, ValueError, TypeError, KeyError):
        return None
    if not isinstance(text, str) or text.count(_QUESTION_SLOT) != 1 or text.count(placeholder) != 1:
        return None
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("").input_ids[:1] == [tokenizer.bos_token_id]:
        text = text[len(bos):]  # the tokenizer adds BOS itself
    return text.replace("{", "{{").replace("}", "}}").replace(_QUESTION_SLOT, "{question}")


class HFAdapter:
    """A loaded transformers LVLM + tokenizer; every stage is a method, everything differentiable w.r.t. pixels.

    Subclasses set ``family``, ``hf_class`` (the transformers class ``from_pretrained`` loads),
    ``default_prompt`` (used when neither the caller nor the checkpoint gives one) and ``capabilities``
    (keys of :data:`robustvtc.models.base.CAPABILITIES`; compressors declare what they require).
    """

    family: ClassVar[str]
    hf_class: ClassVar[str]
    default_prompt: ClassVar[str]
    default_placeholder: ClassVar[str] = "<image>"
    capabilities: ClassVar[frozenset[str]] = frozenset()
    # the image's tokens attend to each other both ways, the text causally (Gemma 3's token_type_ids mask)
    bidirectional_visual: ClassVar[bool] = False

    def __init__(self, model, tokenizer, *, image_mean: Sequence[float] = CLIP_MEAN,
                 image_std: Sequence[float] = CLIP_STD, prompt_template: str | None = None, name: str | None = None,
                 prompt_source: str = "argument"):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name or self.family
        cfg = model.config
        self.image_token_id = int(cfg.image_token_id)
        self.image_placeholder = (tokenizer.convert_ids_to_tokens(self.image_token_id) if tokenizer is not None
                                  else self.default_placeholder)
        if prompt_template is None:
            prompt_template, prompt_source = self.default_prompt, "default"
        if self.image_placeholder not in prompt_template or "{question}" not in prompt_template:
            raise UserInputError(f"prompt_template must contain {self.image_placeholder!r} and '{{question}}'")
        self.prompt_template = prompt_template
        self.prompt_source = prompt_source  # "argument", "preprocessor_config", "chat_template" or "default"
        self.num_llm_layers = int(cfg.text_config.num_hidden_layers)
        self._attention = _DecoderAttention(self.model.model.language_model, self.num_llm_layers)
        self._mean = torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1)
        embedding = model.get_input_embeddings().weight
        self.device, self.dtype = embedding.device, embedding.dtype
        self._prompt_cache: dict[str, tuple[list[int], list[int]]] = {}

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str = "cpu", dtype: str | torch.dtype = "float32",
                        prompt_template: str | None = None, name: str | None = None,
                        image_size: int | tuple[int, int] | None = None, attn_implementation: str = "sdpa",
                        **kwargs) -> "HFAdapter":
        """Load a checkpoint (local directory or hub id; nothing is downloaded when HF_HUB_OFFLINE=1).

        ``image_size`` is the adapter's input resolution (family default when None). ``device_map`` and other
        transformers keywords pass through to ``from_pretrained`` (with a ``device_map``, ``device`` is ignored).
        The prompt is, in order: ``prompt_template``; ``robustvtc_prompt_template`` in the checkpoint's
        preprocessor_config.json; the checkpoint's chat template (chat_template.jinja / .json, else the
        tokenizer's); the family's ``default_prompt``.
        """
        import transformers
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        model = getattr(transformers, cls.hf_class).from_pretrained(
            str(path), dtype=resolve_dtype(dtype), attn_implementation=attn_implementation, **kwargs)
        if "device_map" not in kwargs:
            model = model.to(device)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
        pre = read_json(path, "preprocessor_config.json")
        source = "argument"
        if prompt_template is None and pre.get("robustvtc_prompt_template"):
            prompt_template, source = pre["robustvtc_prompt_template"], "preprocessor_config"
        if prompt_template is None:
            placeholder = tokenizer.convert_ids_to_tokens(int(model.config.image_token_id))
            prompt_template = cls._template_prompt(tokenizer, cls._chat_template(path, tokenizer), placeholder)
            source = "chat_template"
        return cls(model, tokenizer, image_mean=pre.get("image_mean", CLIP_MEAN),
                   image_std=pre.get("image_std", CLIP_STD), prompt_template=prompt_template, prompt_source=source,
                   name=name or str(path), image_size=image_size)

    @classmethod
    def _template_prompt(cls, tokenizer, template: str | None, placeholder: str) -> str | None:
        """The prompt format string a chat template gives (None when it gives none): one user turn, one image."""
        return chat_template_prompt(tokenizer, template, placeholder)

    @staticmethod
    def _chat_template(path: str | Path, tokenizer) -> str | None:
        """The processor's chat template (chat_template.jinja, chat_template.json), else the tokenizer's."""
        jinja = model_file(path, "chat_template.jinja")
        if jinja:
            return jinja.read_text()
        return read_json(path, "chat_template.json").get("chat_template") or getattr(tokenizer, "chat_template", None)

    # ------------------------------------------------------------------ pixels
    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) of the pixels the adapter takes."""
        raise NotImplementedError

    @property
    def pixel_space(self) -> dict:
        """Where an attack's epsilon is measured, for results: resolution, value range, what happens after."""
        h, w = self.input_size
        return {"resolution": [h, w], "range": [0.0, 1.0], "layout": "RGB, (B, 3, H, W) float",
                "normalization": {"mean": self._mean.flatten().tolist(), "std": self._std.flatten().tolist(),
                                  "applied": "inside the adapter, after any perturbation"},
                "model_input": self.describe_input()}

    def describe_input(self) -> str:
        """What the model makes of the pixels (resize, crops, patches), in words."""
        raise NotImplementedError

    def check_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return check_pixels(pixels, self.input_size)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels -> the model's normalised input, on the model's device and dtype (differentiable)."""
        pixels = pixels.to(self.device)
        mean, std = self._mean.to(pixels.device), self._std.to(pixels.device)
        return ((pixels - mean) / std).to(self.dtype)

    def load_image(self, image) -> torch.Tensor:
        """One image (path, PIL, array, tensor) -> (1, 3, H, W) in [0, 1] at the input resolution: the shorter
        side scaled to cover it (bicubic, antialiased, in torch), then centre-cropped."""
        return fit_image(image, self.input_size)

    # ------------------------------------------------------------------ compressed layouts
    compressed_parts: int = 1  # parts compressed independently, each with its share of the budget (LLaVA-NeXT: crops)

    def part(self, tokens: VisualTokens, index: int) -> VisualTokens:
        """The tokens of part ``index`` (the whole set for a one-part model)."""
        return tokens if self.compressed_parts == 1 else tokens.crop(index)

    def lay_out(self, parts: Sequence[tuple[torch.Tensor | list, KeepPlan]]) -> tuple[torch.Tensor | list | VisualEmbeds,
                                                                                    KeepPlan]:
        """The LLM-input layout of the kept tokens of every crop (``(kept, plan)`` per crop, from a compressor
        applied by the target) and one keep plan over the model's visual tokens."""
        if len(parts) != 1:
            raise UserInputError(f"{self.family} has one crop; got kept tokens of {len(parts)}")
        return parts[0]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ text side
    def _prompt_ids(self, question: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the single image placeholder of the formatted prompt."""
        if question not in self._prompt_cache:
            ids = self.tokenizer(self.prompt_template.format(question=question)).input_ids
            count = ids.count(self.image_token_id)
            if count != 1:
                raise UserInputError(f"the prompt must contain exactly one image token, got {count}")
            cut = ids.index(self.image_token_id)
            self._prompt_cache[question] = (ids[:cut], ids[cut + 1:])
        return self._prompt_cache[question]

    def continuation_ids(self, question: str, answer: str) -> list[int]:
        """Ids of ``answer`` as the model would read it right after the prompt (after a space, unless the prompt
        already ends with whitespace, as chat templates ending in a newline do)."""
        text = self.prompt_template.format(question=question)
        sep = "" if text[-1:].isspace() else " "
        full = self.tokenizer(text + sep + answer).input_ids
        prompt = self.tokenizer(text).input_ids
        if full[: len(prompt)] != prompt or len(full) == len(prompt):
            raise UserInputError(f"answer {answer!r} does not tokenize as a continuation of the prompt")
        return full[len(prompt):]

    def _plain_layout(self, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A (K, D) tensor given without layout: the tokens in order, positions from their order."""
        return visual, torch.arange(visual.shape[0], device=visual.device)

    def _visual_rows(self, visual) -> VisualEmbeds:
        if isinstance(visual, VisualEmbeds):
            return visual
        rows = [self._plain_layout(v) for v in batch_rows(visual)]
        return VisualEmbeds([e for e, _ in rows], [s for _, s in rows])

    def _assemble(self, visual, questions: Sequence[str], continuations: Sequence[Sequence[int]] | None):
        """Left-padded input embeddings [prefix | visual | suffix | continuation] and their bookkeeping:
        (embeds, mask, visual_index or None when counts differ, (text_index, text_valid), blocks); ``blocks`` (B, L)
        is 0 at the image's tokens and -1 elsewhere for a family whose image attends both ways, else None."""
        rows = self._visual_rows(visual)
        embed = self.model.get_input_embeddings()
        seqs, vis_pos, txt_pos = [], [], []
        for b, (v, src, q) in enumerate(zip(rows.embeds, rows.sources, questions)):
            pre, suf = self._prompt_ids(q)
            cont = list(continuations[b]) if continuations is not None else []
            ids_pre = torch.tensor(pre, device=self.device, dtype=torch.long)
            ids_post = torch.tensor(suf + cont, device=self.device, dtype=torch.long)
            seqs.append(torch.cat([embed(ids_pre), v.to(self.device, self.dtype), embed(ids_post)], dim=0))
            vis_pos.append(len(pre) + (src.to(self.device) >= 0).nonzero().flatten())
            txt_pos.append(len(pre) + v.shape[0] + torch.arange(len(suf), device=self.device))
        length = max(r.shape[0] for r in seqs)
        pads = [length - r.shape[0] for r in seqs]
        embeds = torch.stack([torch.cat([r.new_zeros(pad, r.shape[1]), r]) for r, pad in zip(seqs, pads)])
        mask = torch.stack([torch.arange(length, device=self.device) >= pad for pad in pads]).long()
        visual_index, visual_valid = _index_rows(vis_pos, pads)
        text_index, text_valid = _index_rows(txt_pos, pads)
        blocks = None
        if self.bidirectional_visual:
            # short rows repeat their last visual position in visual_index: amax keeps a valid entry's mark
            blocks = torch.zeros_like(mask).scatter_reduce(1, visual_index, visual_valid.long(), "amax") - 1
        return (embeds, mask, (visual_index if bool(visual_valid.all()) else None), (text_index, text_valid),
                blocks)

    def _positions(self, mask: torch.Tensor, rows: VisualEmbeds, questions: Sequence[str]) -> torch.Tensor:
        """LLM position ids of an assembled batch: contiguous over the real tokens (B, L)."""
        return _contiguous(mask)

    def _renumber(self, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Positions after an in-LLM method with ``position_policy = "contiguous"`` dropped tokens."""
        return _contiguous(mask)

    def hidden_states(self, visual_embeds, questions: Sequence[str], continuations=None,
                      in_llm: "InLLMHook | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Final-norm hidden states (B, L, D) of the decoder and the 2-D attention mask after any in-LLM pruning."""
        return self._run(visual_embeds, questions, continuations, in_llm)[:2]

    def _run(self, visual_embeds, questions, continuations=None, in_llm=None, cache=None):
        """(hidden, mask, the decoder's record): the assembled sequence through the decoder; ``cache``: a
        transformers ``DynamicCache`` that every layer fills with its keys and values (prefill)."""
        rows = self._visual_rows(visual_embeds)
        if len(rows.embeds) != len(questions):
            raise UserInputError(f"{len(rows.embeds)} images but {len(questions)} questions")
        embeds, mask, visual_index, text_index, blocks = self._assemble(rows, questions, continuations)
        positions = self._positions(mask, rows, questions)
        residuals = self._layer_residuals(rows, mask, questions)
        return self._decode(embeds, mask, positions, visual_index, text_index, in_llm, residuals, cache, blocks)

    def attach_aux(self, embeds, tokens: VisualTokens, plan: KeepPlan | None):
        """The laid-out visual embeddings with ``tokens.aux`` (per-patch features beside the tokens) merged by
        ``plan`` (None: every token, in order); unchanged for families without any."""
        return embeds

    def _layer_residuals(self, rows: VisualEmbeds, mask: torch.Tensor,
                         questions: Sequence[str]) -> list[torch.Tensor] | None:
        """Per decoder layer, what is added to its output (B, L, D) -- Qwen3-VL's DeepStack visual features at the
        visual positions; None for families without it."""
        return None

    def _decode(self, embeds, mask, positions, visual_index, text_index, in_llm, residuals=None, cache=None,
                blocks=None):
        """The decoder layer by layer, with in-LLM pruning before the hook's layers and ``residuals[i]`` added to
        layer i's output. Each layer gets the mask of its type (causal, or causal within the sliding window; the
        image's tokens both ways when ``blocks`` marks them). Returns (final-norm hidden states, mask, record);
        the record lists the stages (first layer, 2-D mask, positions) between pruning layers, which cached
        decoding continues from."""
        lm = self.model.model.language_model
        attention = self._attention
        prune_at = set(in_llm.layers) if in_llm is not None else set()
        if prune_at and visual_index is None:
            raise UserInputError("in-LLM compression needs the same number of visual tokens in every sample")
        h = embeds
        B, L = mask.shape
        alive = torch.arange(L, device=h.device).expand(B, L) if residuals else None  # original index of each row
        prev = None  # (input of the previous layer, its cos/sin per layer type, its 2-D mask, its blocks)
        masks = rope = None
        stages = []
        layer_kwargs = {} if cache is None else {"cache": cache}
        for i, layer in enumerate(lm.layers):
            if i in prune_at:
                ctx = self._in_llm_context(i, h, mask, visual_index, text_index, prev, embeds)
                # sorted columns of visual_index, optional relaxed gains, optional merge weights
                keep, gain, *merge = in_llm.select(ctx)
                h, mask, positions, visual_index, text_index, idx = _drop_visual(
                    h, mask, positions, visual_index, text_index, keep, gain, merge[0] if merge else None)
                if alive is not None:
                    alive = alive.gather(1, idx)
                if blocks is not None:
                    blocks = blocks.gather(1, idx)
                if in_llm.position_policy == "contiguous":
                    positions = self._renumber(mask, positions)
                masks = None
            flat = positions if positions.dim() == 2 else None  # M-RoPE ids are 3-D; masks want 1-D ones
            if masks is None:
                masks = attention.masks(h, mask, flat, blocks)
                rope = attention.rope(h, positions)
                stages.append((i, mask, positions))
            kind = attention.types[i]
            prev = (h, rope, mask, blocks)
            h = layer(h, attention_mask=masks[kind], position_ids=flat, position_embeddings=rope[kind], **layer_kwargs)
            if residuals is not None and i < len(residuals):
                add = residuals[i] if alive.shape[1] == L else residuals[i].gather(
                    1, alive.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
                h = h + add.to(h.dtype)
        return lm.norm(h), mask, {"stages": stages}

    def _in_llm_context(self, i, h, mask, visual_index, text_index, prev, embeds) -> InLLMContext:
        """Signals at the input of decoder layer ``i``; h has the layout of ``prev`` (nothing dropped between)."""
        lm = self.model.model.language_model
        prev_h, rope, prev_mask, blocks = prev
        kinds = self._attention.types
        previous = _RowScorer(lm.layers[i - 1], prev_h, rope[kinds[i - 1]], prev_mask, blocks,
                              self._attention.window(i - 1))
        current = _RowScorer(lm.layers[i], h, rope[kinds[i]], prev_mask, blocks, self._attention.window(i))
        return InLLMContext(i, h, mask, visual_index, text_index[0], text_index[1], previous.rows,
                            previous.keys, embeds, current.rows, lm.norm)

    # ------------------------------------------------------------------ answers
    def logits_at(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """LM-head logits at (B, P) positions of ``hidden``: (B, P, vocab), in float32."""
        idx = positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        return self.model.lm_head(torch.gather(hidden, 1, idx)).float()

    def candidate_logprobs(self, visual_embeds, questions: Sequence[str], candidates: Sequence[str],
                           in_llm: "InLLMHook | None" = None) -> torch.Tensor:
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
                         in_llm: "InLLMHook | None" = None) -> torch.Tensor:
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
                    in_llm: "InLLMHook | None" = None) -> torch.Tensor:
        """Negative log-likelihood of the given answers, per sample (B,): the white-box attack loss."""
        return -self.sequence_logprob(visual_embeds, questions, answers, in_llm)

    def stop_ids(self) -> set[int]:
        """Token ids that end an answer: the tokenizer's EOS and the generation config's."""
        stops = {self.tokenizer.eos_token_id}
        config_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        stops.update(config_eos if isinstance(config_eos, (list, tuple)) else [config_eos])
        return {s for s in stops if s is not None}

    @torch.no_grad()
    def generate(self, visual_embeds, questions: Sequence[str], max_new_tokens: int = 8,
                 in_llm: "InLLMHook | None" = None, cache: bool = True) -> list[str]:
        """Greedy answers.

        ``cache=True``: the prompt runs once (prefill) and every new token is decoded against the decoder's
        key/value cache. An in-LLM compressor then prunes once, in the prefill, and the new tokens attend to the
        pruned cache from its pruning layers on (the KV-cache variant of FastV's lmms-eval port); pre-LLM
        compressors and no compression give the same tokens as ``cache=False``. ``cache=False``: the whole
        sequence re-runs for every new token and an in-LLM compressor re-prunes every forward, as FastV's
        reference code does.
        """
        ids = self.generate_ids(visual_embeds, questions, max_new_tokens, in_llm, cache)
        return [self.tokenizer.decode(g, skip_special_tokens=True).strip() for g in ids]

    @torch.no_grad()
    def generate_ids(self, visual_embeds, questions: Sequence[str], max_new_tokens: int = 8,
                     in_llm: "InLLMHook | None" = None, cache: bool = True) -> list[list[int]]:
        """The greedy answers' token ids (stop token excluded); see :meth:`generate`."""
        if not cache:
            return self._generate_uncached(visual_embeds, questions, max_new_tokens, in_llm)
        from transformers import DynamicCache

        stops = self.stop_ids()
        rows = self._visual_rows(visual_embeds)
        kv = DynamicCache()
        hidden, _, record = self._run(rows, questions, in_llm=in_llm, cache=kv)
        stages = [[first, m, p] for first, m, p in record["stages"]]
        # stage 0 (layer 0, never pruned) has the uncached layout; each new token is text, one position further
        last_prompt_position = stages[0][2][..., -1:]
        policy = in_llm.position_policy if in_llm is not None else "original"
        generated: list[list[int]] = [[] for _ in questions]
        done = [False] * len(questions)
        embed = self.model.get_input_embeddings()
        lm = self.model.model.language_model
        for step in range(max_new_tokens):
            nxt = self.model.lm_head(hidden[:, -1]).float().argmax(-1)
            for b, t in enumerate(nxt.tolist()):
                if not done[b]:
                    if t in stops:
                        done[b] = True
                    else:
                        generated[b].append(t)
            if all(done) or step == max_new_tokens - 1:
                break
            # the new token's position in the uncached layout, then per stage as the uncached path renumbers it
            original = last_prompt_position + step + 1
            one = stages[0][1].new_ones(len(questions), 1)
            h = embed(nxt.unsqueeze(1))
            for s, stage in enumerate(stages):
                mask_s = torch.cat([stage[1], one], 1)
                pos_s = torch.cat([stage[2], original], -1)
                if s > 0 and policy == "contiguous":
                    pos_s = self._renumber(mask_s, pos_s)
                stage[1], stage[2] = mask_s, pos_s
            hidden = self._decode_step(h, stages, kv, lm)
        return generated

    def _decode_step(self, h: torch.Tensor, stages: list, kv, lm) -> torch.Tensor:
        """One new token (B, 1, D) through every layer against the cache; ``stages`` hold each stage's 2-D mask
        and positions with the new token appended. Returns the final-norm hidden state (B, 1, D)."""
        starts = [s[0] for s in stages]
        attention = self._attention
        for i, layer in enumerate(lm.layers):
            if i in starts:
                _, mask_s, pos_s = stages[starts.index(i)]
                pos = pos_s[..., -1:]
                rope = attention.rope(h, pos)
                masks = {kind: _additive(_allowed(mask_s, mask_s.new_full((mask_s.shape[0], 1), mask_s.shape[1] - 1),
                                                  None, attention.window_of(kind))[:, None], h.dtype)
                         for kind in rope}
                flat = pos if pos.dim() == 2 else None
            kind = attention.types[i]
            h = layer(h, attention_mask=masks[kind], position_ids=flat, position_embeddings=rope[kind], cache=kv)
        return lm.norm(h)  # DeepStack residuals are zero at text tokens

    def _generate_uncached(self, visual_embeds, questions, max_new_tokens, in_llm) -> list[str]:
        stops = self.stop_ids()
        generated: list[list[int]] = [[] for _ in questions]
        done = [False] * len(questions)
        for _ in range(max_new_tokens):
            hidden, _ = self.hidden_states(visual_embeds, questions, generated, in_llm=in_llm)
            last = torch.full((hidden.shape[0], 1), hidden.shape[1] - 1, device=hidden.device)
            nxt = self.logits_at(hidden, last)[:, 0].argmax(-1).tolist()
            for b, t in enumerate(nxt):
                if not done[b]:
                    if t in stops:
                        done[b] = True
                    else:
                        generated[b].append(t)
            if all(done):
                break
        return generated


def batch_rows(visual_embeds) -> list[torch.Tensor]:
    """A (B, K, D) tensor or a list of per-image (K_b, D) tensors -> the list."""
    if isinstance(visual_embeds, torch.Tensor):
        if visual_embeds.dim() != 3:
            raise UserInputError(f"visual embeddings must be (B, K, D), got {tuple(visual_embeds.shape)}")
        return list(visual_embeds.unbind(0))
    return list(visual_embeds)


def _contiguous(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _index_rows(positions: list[torch.Tensor], pads: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, n_max) left-padded sequence positions per row and a validity mask; short rows repeat their last one."""
    device = positions[0].device
    n_max = max(p.numel() for p in positions)
    index = torch.zeros(len(positions), n_max, dtype=torch.long, device=device)
    valid = torch.zeros(len(positions), n_max, dtype=torch.bool, device=device)
    for b, (p, pad) in enumerate(zip(positions, pads)):
        if p.numel():
            index[b] = pad + p[torch.arange(n_max, device=device).clamp(max=p.numel() - 1)]
            valid[b, :p.numel()] = True
    return index, valid


class _RowScorer:
    """Queries/keys of one decoder layer on its input, computed on first use: head-averaged attention rows
    of chosen queries without materialising the full attention (SDPA/FA stay usable). The rows follow the
    layer's own attention: per-head q/k norms (Qwen3, Gemma 3), logit soft-capping, a sliding window, and the
    image's tokens attending both ways where ``blocks`` marks them."""

    def __init__(self, layer, hidden, cos_sin, mask, blocks=None, window: int | None = None):
        self.layer, self.hidden, self.mask, self.blocks, self.window = layer, hidden, mask, blocks, window
        self.cos, self.sin = cos_sin
        self._qk = None

    def _project(self):
        if self._qk is None:
            attn = self.layer.self_attn
            rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # the family's own RoPE
            normed = self.layer.input_layernorm(self.hidden)
            shape = (*normed.shape[:-1], -1, attn.head_dim)
            q = attn.q_proj(normed).view(shape)
            k = attn.k_proj(normed).view(shape)
            if hasattr(attn, "q_norm"):  # per-head RMSNorm before RoPE
                q, k = attn.q_norm(q), attn.k_norm(k)
            self._qk = rotate(q.transpose(1, 2), k.transpose(1, 2), self.cos, self.sin)
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
        cap = getattr(attn, "attn_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        allowed = _allowed(self.mask, query_index, self.blocks, self.window)
        logits = logits.float().masked_fill(~allowed.unsqueeze(1), torch.finfo(torch.float32).min)
        return logits.softmax(-1).mean(dim=1)


class _DecoderAttention:
    """What differs between a decoder's layers: each layer's type (full or sliding-window attention), its
    rotary embedding (one, or one per layer type as in Gemma 3) and its mask."""

    KINDS = ("full_attention", "sliding_attention")

    def __init__(self, lm, num_layers: int):
        self.lm = lm
        config = lm.config
        self.types = list(getattr(config, "layer_types", None) or ["full_attention"] * num_layers)
        unknown = sorted(set(self.types) - set(self.KINDS))
        if unknown:
            raise UserInputError(f"decoder layer types {', '.join(unknown)} are not supported; accepted: "
                                 f"{', '.join(self.KINDS)}")
        if getattr(config, "use_bidirectional_attention", False):
            raise UserInputError("text_config.use_bidirectional_attention=True makes an encoder, not a generative "
                                 "LVLM; accepted: a causal decoder")
        self.sliding_window = None
        if "sliding_attention" in self.types:
            window = getattr(config, "sliding_window", None)
            if isinstance(window, bool) or not isinstance(window, int) or window < 1:
                raise UserInputError(f"text_config.sliding_window must be a positive integer for the decoder's "
                                     f"sliding-attention layers, got {window!r}")
            self.sliding_window = window
        self._rope_per_type = "layer_type" in inspect.signature(lm.rotary_emb.forward).parameters

    def window_of(self, kind: str) -> int | None:
        return self.sliding_window if kind == "sliding_attention" else None

    def window(self, layer: int) -> int | None:
        return self.window_of(self.types[layer])

    def rope(self, h: torch.Tensor, positions: torch.Tensor) -> dict:
        """(cos, sin) per layer type present."""
        kinds = dict.fromkeys(self.types)
        if self._rope_per_type:
            return {kind: self.lm.rotary_emb(h, position_ids=positions, layer_type=kind) for kind in kinds}
        cos_sin = self.lm.rotary_emb(h, position_ids=positions)
        return dict.fromkeys(kinds, cos_sin)

    def masks(self, h: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None, blocks) -> dict:
        """Each layer type's attention mask as transformers builds it for the attention implementation in use:
        causal (OR the image block both ways), AND the sliding window for sliding layers -- Gemma 3's order."""
        from transformers.masking_utils import create_causal_mask

        both_ways = _same_block(blocks) if blocks is not None else None
        return {kind: create_causal_mask(config=self.lm.config, inputs_embeds=h, attention_mask=mask,
                                         position_ids=positions, or_mask_function=both_ways,
                                         and_mask_function=_within(self.window_of(kind)),
                                         **_no_cache_argument(create_causal_mask))
                for kind in dict.fromkeys(self.types)}


def _same_block(blocks: torch.Tensor):
    def inner(batch_idx, head_idx, q_idx, kv_idx):
        q_block = blocks[batch_idx, q_idx]
        return (q_block == blocks[batch_idx, kv_idx]) & (q_block >= 0)
    return inner


def _within(window: int | None):
    if window is None:
        return None

    def inner(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx > q_idx - window
    return inner


def _allowed(mask: torch.Tensor, query_index: torch.Tensor, blocks: torch.Tensor | None,
             window: int | None) -> torch.Tensor:
    """(B, Q, L) which keys the queries at ``query_index`` (B, Q) attend to: the same rule as
    :meth:`_DecoderAttention.masks` -- (causal OR same image block) AND window AND not padding."""
    cols = torch.arange(mask.shape[1], device=mask.device).view(1, 1, -1)
    rows = query_index.unsqueeze(-1)
    allowed = cols <= rows
    if blocks is not None:
        q_block = blocks.gather(1, query_index).unsqueeze(-1)
        allowed = allowed | ((blocks.unsqueeze(1) == q_block) & (q_block >= 0))
    if window is not None:
        allowed = allowed & (cols > rows - window)
    return allowed & mask.bool().unsqueeze(1)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _drop_visual(h, mask, positions, visual_index, text_index, keep, gain, merge=None):
    """Remove the visual tokens not in ``keep`` (B, K', sorted; same count per row); scale kept ones by ``gain``.

    ``merge`` (B, K', K) (optional): the k-th visual token that goes on becomes ``merge[:, k] @`` the K alive visual
    tokens' hidden states (one-hot rows are copied exactly, not multiplied), then is scaled by ``gain``.
    Kept places keep their positions (``positions`` is (B, L) or M-RoPE's (3, B, L)); renumbering is the caller's.
    """
    old_h, old_visual = h, visual_index
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
    positions = torch.gather(positions, -1, idx.expand(*positions.shape[:-1], -1))
    # new index of an old position = number of alive positions before it
    rank = alive.long().cumsum(-1) - 1
    visual_index = torch.gather(rank, 1, kept_pos)
    text_index = (torch.gather(rank, 1, text_index[0]), text_index[1])
    if merge is not None:
        d = h.shape[-1]
        alive_h = torch.gather(old_h, 1, old_visual.unsqueeze(-1).expand(-1, -1, d))
        merged = torch.einsum("bkn,bnd->bkd", merge.to(h.dtype), alive_h)
        one_hot = (merge == 1).sum(-1, keepdim=True).eq(1) & (merge != 0).sum(-1, keepdim=True).eq(1)
        copied = torch.gather(alive_h, 1, merge.argmax(-1, keepdim=True).expand(-1, -1, d))
        h = h.scatter(1, visual_index.unsqueeze(-1).expand(-1, -1, d), torch.where(one_hot, copied, merged))
    if gain is not None:
        scale = torch.ones(B, new_len, 1, dtype=h.dtype, device=h.device)
        h = h * scale.scatter(1, visual_index.unsqueeze(-1), gain.unsqueeze(-1).to(h.dtype))
    return h, mask, positions, visual_index, text_index, idx


@functools.lru_cache(maxsize=None)
def _no_cache_argument(create_causal_mask) -> dict:
    """``cache=None``, or ``past_key_values=None`` for transformers releases before the argument was renamed
    (passing the old name to a new release raises a FutureWarning on every forward)."""
    import inspect

    return {"cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values": None}
