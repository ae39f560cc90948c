"""Train the built-in LLaVA from scratch on the synthetic task (``robustvtc train-builtin``).

Recipe (all choices are here and recorded in ``training_report.json``):

* Stage 1 (``vision_steps``): the vision tower alone, on CLIP-like objectives that are discarded after
  training -- the CLS token of the last layer (CLIP's pooled output) and of the feature layer predict which
  (colour, shape) pairs the scene holds, so the CLS token must attend to the objects (the property
  CLS-attention compressors rely on in CLIP); each patch token of the feature layer predicts the colour and
  shape of the object covering it.
* Stage 2 (``steps``): the whole LLaVA, LM loss on the one-word answer and the end-of-sequence token through
  the very adapter users attack, vision objectives kept. A tiny LLM trained from scratch does not find
  content-based look-up among many tokens in a CPU budget, so stage 2 adds two training-only aids:
  - a curriculum (``curriculum_steps``): at first the LLM sees only the patches of the objects the question
    is about, then the other objects and the background fade in;
  - intermediate supervision at decoder layer 2 (never layer 1, whose attention FastV scores with): the
    last prompt token's input state predicts the question's words, and its attention mass on the question's
    objects is maximised.
  After the curriculum, half of the batches show only k ~ U[16, N] visual tokens (object patches first, then
  random background, raster order, contiguous positions) so the LLM tolerates the shorter sequences
  compressors produce, as large LVLMs do by scale. Object patches always come from ground truth, never
  from the model's attention.

Data are drawn fresh every step from the train split (sample index = step * batch + j), so the run is
deterministic for a seed and never repeats an image.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .data import synthetic as S
from .models.builtin import CLIP_MEAN, CLIP_STD, PROMPT_TEMPLATE, build_tokenizer, builtin_config
from .models.llava import LlavaAdapter

COMBOS = [(c, s) for c in S.COLOURS for s in S.SHAPES]
QUESTION_WORDS = S.question_vocabulary()


@dataclass
class TrainConfig:
    vision_steps: int = 250  # stage 1: the vision tower alone on its CLIP-like objectives (cheap, no LLM)
    steps: int = 1000  # stage 2: the whole LLaVA on answers, vision objectives kept
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 60
    weight_decay: float = 0.05
    curriculum_steps: int = 600  # stage 2 starts with only the question's objects visible, then adds the rest
    drop_prob: float = 0.5
    min_keep: int = 16
    aux_weight: float = 0.5
    grounding_weight: float = 0.3
    seed: int = 0
    eval_every: int = 250
    eval_samples: int = 250


class _Stream(torch.utils.data.IterableDataset):
    """Batches of the train split, rendered in a worker process while the main process trains."""

    def __init__(self, cfg: TrainConfig, start_step: int = 0):
        self.cfg, self.start_step = cfg, start_step

    def __iter__(self):
        cfg = self.cfg
        for step in range(self.start_step, cfg.vision_steps + cfg.steps):
            samples = [S.generate_sample(step * cfg.batch_size + j, "train", cfg.seed) for j in range(cfg.batch_size)]
            yield _collate(samples)


def _collate(samples: list[S.VQASample]) -> dict:
    g = S.IMAGE_SIZE // S.PATCH_SIZE
    pixels = S.to_pixels(samples)
    presence = torch.zeros(len(samples), len(COMBOS))
    patch_colour = torch.zeros(len(samples), g * g, dtype=torch.long)  # 0 = background
    patch_shape = torch.zeros(len(samples), g * g, dtype=torch.long)
    object_mask = torch.zeros(len(samples), g * g, dtype=torch.bool)
    referent_mask = torch.zeros(len(samples), g * g, dtype=torch.bool)
    colours, shapes = list(S.COLOURS), list(S.SHAPES)
    for b, s in enumerate(samples):
        cov = s.patch_coverage().reshape(len(s.objects), -1)
        for o in s.objects:
            presence[b, COMBOS.index((o.colour, o.shape))] = 1
        if len(s.objects):
            best = cov.argmax(0)
            strong = cov.max(0) > 0.2
            for p in np.nonzero(strong)[0]:
                o = s.objects[best[p]]
                patch_colour[b, p] = colours.index(o.colour) + 1
                patch_shape[b, p] = shapes.index(o.shape) + 1
            object_mask[b] = torch.from_numpy((cov > 0.02).any(0))
            if s.referents:
                referent_mask[b] = torch.from_numpy((cov[list(s.referents)] > 0.02).any(0))
    question_words = torch.tensor([[w in s.question.split() for w in QUESTION_WORDS] for s in samples]).float()
    return {"pixels": pixels, "questions": [s.question for s in samples], "question_words": question_words, "answers": [s.answer for s in samples],
            "presence": presence, "patch_colour": patch_colour, "patch_shape": patch_shape, "object_mask": object_mask,
            "referent_mask": referent_mask}


class _AttentionProbe:
    """In-LLM hook that prunes nothing: at decoder layer ``layer`` it reads the last prompt token's (``offset``
    positions before the end) input state and attention over the visual tokens, for the grounding objectives."""

    position_policy = "original"

    def __init__(self, layer: int, offset: int):
        self.layers, self.offset = (layer,), offset
        self.visual_attention: torch.Tensor | None = None

    def select(self, ctx):
        b, length = ctx.attention_mask.shape
        query = torch.full((b, 1), length - 1 - self.offset, device=ctx.hidden.device)
        self.visual_attention = ctx.current_attention_rows(query)[:, 0].gather(1, ctx.visual_index)
        self.query_state = ctx.hidden[:, length - 1 - self.offset]
        keep = torch.arange(ctx.visual_index.shape[1], device=ctx.hidden.device).expand(b, -1)
        return keep, None


def _curriculum_indices(batch: dict, progress: float, gen: torch.Generator) -> torch.Tensor:
    """Visible patches while the LLM learns to look things up: the question's referent objects always, each
    other object with probability ``progress``, background with probability ``progress**2`` (raster order)."""
    refs, objects = batch["referent_mask"], batch["object_mask"]
    shape = objects.shape
    visible = refs | (objects & (torch.rand(shape, generator=gen) < progress))
    visible |= torch.rand(shape, generator=gen) < progress ** 2
    k = max(int(visible.sum(-1).max()), 4)
    priority = visible.float() * 2 + torch.rand(shape, generator=gen)
    return priority.topk(k, dim=-1).indices.sort(dim=-1).values


def _keep_indices(object_mask: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """(B, k) raster-ordered indices: object patches first (random order if more than k), then random others."""
    noise = torch.rand(object_mask.shape, generator=gen)
    priority = noise + object_mask.float() * 2.0
    return priority.topk(k, dim=-1).indices.sort(dim=-1).values


def new_builtin(seed: int = 0) -> LlavaAdapter:
    """A freshly initialised built-in model wrapped in its adapter."""
    from transformers import LlavaForConditionalGeneration

    tok = build_tokenizer()
    cfg = builtin_config(len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id, tok.bos_token_id,
                         tok.eos_token_id)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa")
    return LlavaAdapter(model, tok, image_mean=CLIP_MEAN, image_std=CLIP_STD, prompt_template=PROMPT_TEMPLATE,
                        name="builtin")


def save_builtin(adapter: LlavaAdapter, out_dir: Path, report: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    adapter.model.save_pretrained(out_dir)
    adapter.tokenizer.save_pretrained(out_dir)
    size = {"height": adapter.image_size, "width": adapter.image_size}
    pre = {"image_processor_type": "CLIPImageProcessor", "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
           "size": {"shortest_edge": adapter.image_size}, "crop_size": size, "do_center_crop": True,
           "do_resize": True, "do_normalize": True, "do_rescale": True, "rescale_factor": 1 / 255,
           "robustvtc_prompt_template": PROMPT_TEMPLATE}
    (out_dir / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    (out_dir / "training_report.json").write_text(json.dumps(report, indent=2))


def train_builtin(out_dir: str | Path, cfg: TrainConfig | None = None, log=print) -> dict:
    cfg = cfg or TrainConfig()
    torch.manual_seed(cfg.seed)
    adapter = new_builtin(cfg.seed)
    model = adapter.model
    model.train()
    model.requires_grad_(True)
    vdim = model.config.vision_config.hidden_size
    heads = torch.nn.ModuleDict({
        "pool": torch.nn.Linear(vdim, len(COMBOS)),
        "cls": torch.nn.Linear(vdim, len(COMBOS)),
        "patch_colour": torch.nn.Linear(vdim, len(S.COLOURS) + 1),
        "patch_shape": torch.nn.Linear(vdim, len(S.SHAPES) + 1),
        "question": torch.nn.Linear(model.config.text_config.hidden_size, len(QUESTION_WORDS)),
    })
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    total = cfg.vision_steps + cfg.steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    gen = torch.Generator().manual_seed(cfg.seed)
    eos = adapter.tokenizer.eos_token_id
    answer_id = {a: adapter.continuation_ids("what color is the circle ?", a)[0] for a in S.ANSWERS}
    tower = model.model.vision_tower
    grounding_layer = 2  # FastV scores with layer 1's attention; that layer stays free of supervision
    loader = torch.utils.data.DataLoader(_Stream(cfg), batch_size=None, num_workers=1, prefetch_factor=4)
    history, t0 = [], time.time()
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    ce = torch.nn.functional.cross_entropy
    for step, batch in enumerate(loader):
        out = tower(pixel_values=adapter.normalize(batch["pixels"]), output_hidden_states=True)
        hidden = out.hidden_states[adapter.feature_layer + 1]
        feats = hidden[:, 1:]
        presence = batch["presence"]
        parts = {"pool": bce(heads["pool"](out.pooler_output), presence),
                 "cls": bce(heads["cls"](hidden[:, 0]), presence),
                 "colour": ce(heads["patch_colour"](feats).flatten(0, 1), batch["patch_colour"].flatten()),
                 "shape": ce(heads["patch_shape"](feats).flatten(0, 1), batch["patch_shape"].flatten())}
        loss = cfg.aux_weight * sum(parts.values())
        if step >= cfg.vision_steps:  # stage 2: answers through the full LLaVA
            progress = (step - cfg.vision_steps) / cfg.curriculum_steps
            if progress < 1:
                idx = _curriculum_indices(batch, progress, gen)
            elif torch.rand((), generator=gen).item() < cfg.drop_prob:
                k = int(torch.randint(cfg.min_keep, feats.shape[1] + 1, (), generator=gen))
                idx = _keep_indices(batch["object_mask"], k, gen)
            else:
                idx = torch.arange(feats.shape[1]).expand(feats.shape[0], -1)
            feats = torch.gather(feats, 1, idx.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))
            conts = [[answer_id[a], eos] for a in batch["answers"]]
            probe = _AttentionProbe(grounding_layer, offset=2)
            h, _ = adapter.hidden_states(adapter.project(feats), batch["questions"], conts, in_llm=probe)
            L = h.shape[1]
            logits = adapter.logits_at(h, torch.tensor([[L - 3, L - 2]]).expand(h.shape[0], -1))
            parts["lm"] = ce(logits.flatten(0, 1), torch.tensor(conts).flatten())
            referents = torch.gather(batch["referent_mask"], 1, idx)
            has_ref = referents.any(-1)
            parts["question"] = bce(heads["question"](probe.query_state), batch["question_words"])
            loss = loss + cfg.grounding_weight * parts["question"]
            if has_ref.any():
                mass = (probe.visual_attention * referents).sum(-1)[has_ref]
                parts["ground"] = -(mass + 1e-6).log().mean()
                loss = loss + cfg.grounding_weight * parts["ground"]
            loss = loss + parts["lm"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0:
            log(f"step {step:5d}  " + "  ".join(f"{k} {v.item():.3f}" for k, v in parts.items())
                + f"  {time.time() - t0:6.0f}s")
        done = step + 1 - cfg.vision_steps
        if done > 0 and (done % cfg.eval_every == 0 or done == cfg.steps):
            model.eval()
            acc = quick_accuracy(adapter, cfg.eval_samples)
            model.train()
            history.append({"step": step + 1, "val_accuracy": acc, "seconds": round(time.time() - t0, 1)})
            log(f"step {step + 1:5d}  val accuracy {acc:.3f}")
    model.eval()
    model.requires_grad_(False)
    report = {"config": asdict(cfg), "history": history, "train_seconds": round(time.time() - t0, 1),
              "torch_threads": torch.get_num_threads()}
    save_builtin(adapter, Path(out_dir), report)
    return report


@torch.no_grad()
def quick_accuracy(adapter: LlavaAdapter, n: int, split: str = "val") -> float:
    samples = S.generate_dataset(n, split)
    correct = 0
    for i in range(0, n, 50):
        chunk = samples[i:i + 50]
        pixels = S.to_pixels(chunk)
        tokens = adapter.encode(pixels)
        scores = adapter.candidate_logprobs(adapter.project(tokens.features), [s.question for s in chunk], S.ANSWERS)
        pred = scores.argmax(-1).tolist()
        correct += sum(S.ANSWERS[p] == s.answer for p, s in zip(pred, chunk))
    return correct / n
