"""Every adapter family on tiny random models saved with save_pretrained and loaded through load_model(path),
offline: the model's own logits with all tokens, the pruned path equal to the model with dropped tokens masked
(Gemma 3: fed only the kept tokens), the in-LLM attention rows equal to eager attention, bf16, every compressor
run or refused in one line, the attacks. Then what is particular to Qwen3-VL (+ MoE), InternVL, LLaVA-OneVision
and Gemma 3 (LLaVA, LLaVA-NeXT and Qwen2(.5)-VL: tests/test_real_adapters.py): dispatch, geometry, prompts,
preprocessing equal to the HF processor."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from robustvtc.compression import compatible_compressors, list_compressors
from robustvtc.errors import UserInputError
from robustvtc.models import (Gemma3Adapter, InternVLAdapter, LlavaNextAdapter, LlavaOnevisionAdapter, Qwen3VLAdapter,
                              Qwen3VLMoeAdapter, load_model)
from robustvtc.models.base import VisualEmbeds
from robustvtc.models.qwen2_vl import Qwen2VLAdapter
from robustvtc.target import Target
import test_real_adapters as older
from test_real_adapters import (CANDIDATES, LLAVA_SPECIAL, QUESTIONS, QWEN_SPECIAL, TINY_KWARGS,
                                assert_rows_equal_eager_attention, hf_model_inputs, load_tiny, pixels_for, save_tiny,
                                tiny_tokenizer)

FAMILIES = ["qwen3_vl", "qwen3_vl_moe", "internvl", "llava_onevision", "gemma3"]
EVERY_FAMILY = [*older.FAMILIES, *FAMILIES]
CLASSES = {"qwen3_vl": Qwen3VLAdapter, "qwen3_vl_moe": Qwen3VLMoeAdapter, "internvl": InternVLAdapter,
           "llava_onevision": LlavaOnevisionAdapter, "gemma3": Gemma3Adapter}
BUDGET = {**older.BUDGET, "qwen3_vl": 8, "qwen3_vl_moe": 8, "internvl": 8, "llava_onevision": 10, "gemma3": 8}
CLS_METHODS = {"fastervlm", "visionzip", "vispruner", "prumerge", "prumerge_plus", "tome", "flowcut", "vscan",
               "hiprune"}
RECEIVED_METHODS = {"visionzip_qwen"}  # VisionZip's CLS-free port: published for Qwen2.5-VL (and Qwen2-VL's tower)
# none of the newer families has a CLS per LLM token or VisionZip's Qwen2.5-VL port
REFUSED = {**older.REFUSED, **dict.fromkeys(FAMILIES, CLS_METHODS | RECEIVED_METHODS)}
INTERNVL_SPECIAL = ["<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"]
GEMMA3_SPECIAL = ["<pad>", "<unk>", "<bos>", "</s>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                  "<end_of_image>", "<image_soft_token>"]
# Gemma 3 in small: a sliding layer of window 8 (a prompt is ~30 tokens, the image 16), then a global one that
# reads what the image tokens made of each other in it
GEMMA3_WINDOW = 8


def tiny_model(family: str):
    """A 2-layer, width-64 random model of ``family`` and its tokenizer (the older families: test_real_adapters')."""
    import transformers as T

    if family in older.FAMILIES:
        return older.tiny_model(family)
    text = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, bos_token_id=3, eos_token_id=3, pad_token_id=0)
    if family.startswith("qwen3_vl"):
        tok, vocab = tiny_tokenizer(QWEN_SPECIAL, None)
        ids = dict(image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
                   vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"])
        vision = dict(depth=3, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=4, spatial_merge_size=2,
                      temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=16,
                      deepstack_visual_indexes=[0, 1])
        text.update(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "mrope_section": [2, 3, 3], "mrope_interleaved": True})
        if family == "qwen3_vl":
            cfg = T.Qwen3VLConfig(vision_config=vision, text_config=text, **ids)
            return T.Qwen3VLForConditionalGeneration(cfg), tok
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
        cfg = T.Qwen3VLMoeConfig(vision_config=vision, text_config=text, **ids)
        return T.Qwen3VLMoeForConditionalGeneration(cfg), tok
    if family == "gemma3":
        tok, vocab = tiny_tokenizer(GEMMA3_SPECIAL, "<bos>")
        vision = T.SiglipVisionConfig(image_size=32, patch_size=4, num_hidden_layers=2, hidden_size=64,
                                      intermediate_size=128, num_attention_heads=4)
        text = T.Gemma3TextConfig(**{**text, "bos_token_id": 2, "eos_token_id": 3}, head_dim=16,
                                  query_pre_attn_scalar=16, sliding_window=GEMMA3_WINDOW,
                                  layer_types=["sliding_attention", "full_attention"])
        cfg = T.Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=16,
                             image_token_id=vocab["<image_soft_token>"], boi_token_id=vocab["<start_of_image>"],
                             eoi_token_id=vocab["<end_of_image>"])
        model = T.Gemma3ForConditionalGeneration(cfg)
        # transformers initialises the input projection to zeros (the image would not reach the LLM)
        torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.1)
        return model, tok
    if family == "internvl":
        tok, vocab = tiny_tokenizer(INTERNVL_SPECIAL, None)
        vision = T.InternVLVisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=128, image_size=[32, 32], patch_size=[4, 4])
        cfg = T.InternVLConfig(vision_config=vision, text_config=T.Qwen2Config(**text),
                               image_token_id=vocab["<IMG_CONTEXT>"], image_seq_length=16)
        return T.InternVLForConditionalGeneration(cfg), tok
    tok, vocab = tiny_tokenizer(LLAVA_SPECIAL + ["<|im_start|>", "<|im_end|>"], "<s>")
    vision = T.SiglipVisionConfig(image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=64,
                                  intermediate_size=128, num_attention_heads=4)
    text = T.Qwen2Config(**{**text, "bos_token_id": 2, "eos_token_id": 3})
    cfg = T.LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=vocab["<image>"],
                                 image_grid_pinpoints=[[32, 64], [64, 32], [64, 64], [128, 128]],
                                 vision_feature_layer=-1, vision_feature_select_strategy="full",
                                 vision_aspect_ratio="anyres_max_4")
    return T.LlavaOnevisionForConditionalGeneration(cfg), tok


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_tiny(tiny_model, EVERY_FAMILY, tmp_path_factory)


@pytest.fixture(scope="module")
def adapters(saved):
    return load_tiny(saved)


# ---------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("family", FAMILIES)
def test_dispatch_on_model_type(adapters, family):
    a = adapters[family]
    assert type(a) is CLASSES[family] and a.family == family
    assert a.pixel_space["normalization"]["mean"] == pytest.approx([0.5, 0.4, 0.3])
    assert a.capabilities == frozenset()  # no CLS attention per LLM token in any of them


def test_onevision_geometry(adapters, saved):
    a = adapters["llava_onevision"]
    assert a.input_size == (64, 64) and a.num_crops == 5  # 128x128 (4 x 4 tiles) needs interpolation: not default
    with pytest.raises(UserInputError, match=r"more tiles than anyres_max_4"):
        load_model(str(saved["llava_onevision"]), image_size=128)
    with pytest.raises(UserInputError, match="reads one 32x32 tile"):
        load_model(str(saved["internvl"]), image_size=64)


# Gemma 3's chat template, cut to the image / text / turn rules
GEMMA3_CHAT = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else "
               "m['role'] }}\n{% for item in m['content'] %}{% if item['type'] == 'image' %}<start_of_image>{% elif "
               "item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}"
               "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def test_gemma3_prompt_from_its_chat_template(saved, tmp_path):
    """The template writes <start_of_image>; the prompt holds the processor's expansion of it around the image."""
    import shutil

    path = tmp_path / "gemma3"
    shutil.copytree(saved["gemma3"], path)
    (path / "chat_template.jinja").write_text(GEMMA3_CHAT)
    a = load_model(str(path))
    assert a.prompt_source == "chat_template"
    assert a.prompt_template == ("<start_of_turn>user\n\n\n<start_of_image><image_soft_token><end_of_image>\n\n"
                                 "{question}<end_of_turn>\n<start_of_turn>model\n")


@pytest.mark.parametrize("family", EVERY_FAMILY)
def test_bf16_loads_and_scores(saved, family):
    a = load_model(str(saved[family]), dtype="bf16", image_size=32 if family.startswith("qwen") else None)
    assert a.dtype == torch.bfloat16
    scores = Target(a, "pooling", BUDGET[family]).candidate_logprobs(
        pixels_for(a), QUESTIONS, CANDIDATES)
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("family", EVERY_FAMILY)
def test_all_tokens_give_the_models_own_logits(adapters, family):
    a = adapters[family]
    px = pixels_for(a)
    ours = Target(a, "none").candidate_logprobs(px, QUESTIONS, CANDIDATES)
    for b, q in enumerate(QUESTIONS):
        ref = a.model(**hf_model_inputs(a, px[b:b + 1], q)).logits[0, -1].log_softmax(-1)
        cand = [a.continuation_ids(q, c)[0] for c in CANDIDATES]
        torch.testing.assert_close(ours[b], ref[cand], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", [f for f in EVERY_FAMILY if f != "gemma3"])  # gemma3: its window counts fed tokens
def test_pruned_path_equals_the_model_with_dropped_tokens_masked(adapters, family):
    """Pre-LLM pruning = the HF model on the full sequence with the dropped image tokens masked out, at the
    positions we claim: M-RoPE ids of the unpruned layout (Qwen), contiguous ids (the others)."""
    a = adapters[family]
    px = pixels_for(a, batch=1)
    fwd = Target(a, "random", BUDGET[family], seed=1).forward(px)
    ours = a.candidate_logprobs(fwd.embeds, QUESTIONS[:1], CANDIDATES)[0]
    full = a._visual_rows(a.project(a.encode(px).features))
    extra = hf_model_inputs(a, px, QUESTIONS[0])
    ids = extra.pop("input_ids")
    n = int((ids == a.image_token_id).sum())
    start = ids[0].tolist().index(a.image_token_id)
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    kept = fwd.embeds.sources[0] if hasattr(fwd.embeds, "sources") else fwd.plan.primary_sources()[0]
    keep[start:start + n] = torch.isin(full.sources[0], kept) | (full.sources[0] < 0)
    assert int(keep.sum()) == ids.shape[1] - a.num_visual_tokens + BUDGET[family]
    mask = keep.long().unsqueeze(0)
    if isinstance(a, Qwen2VLAdapter):
        positions, _ = a.model.model.get_rope_index(ids, extra["mm_token_type_ids"], extra["image_grid_thw"])
        torch.testing.assert_close(a._positions(torch.ones_like(ids), full, QUESTIONS[:1]), positions)
        # the compressed layout's ids are the unpruned ids at the kept tokens
        torch.testing.assert_close(a._positions(torch.ones(1, int(keep.sum()), dtype=torch.long), fwd.embeds,
                                                QUESTIONS[:1]), positions[:, :, keep])
    else:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ref = a.model(input_ids=ids, attention_mask=mask, position_ids=positions, **extra).logits[0, -1].log_softmax(-1)
    cand = [a.continuation_ids(QUESTIONS[0], c)[0] for c in CANDIDATES]
    torch.testing.assert_close(ours, ref[cand], atol=1e-5, rtol=1e-5)


def test_gemma3_pruned_path_equals_the_model_fed_only_the_kept_tokens(adapters):
    """A compressed Gemma 3 reads a shorter sequence: the sliding window counts the tokens it is fed, and the
    kept image tokens attend to each other both ways -- as the model's own forward does on those tokens."""
    a = adapters["gemma3"]
    px = pixels_for(a, batch=1)
    fwd = Target(a, "random", BUDGET["gemma3"], seed=1).forward(px)
    ours = a.candidate_logprobs(fwd.embeds, QUESTIONS[:1], CANDIDATES)[0]
    ids = hf_model_inputs(a, px, QUESTIONS[0], image_tokens=BUDGET["gemma3"])["input_ids"]
    assert ids.shape[1] > 2 * GEMMA3_WINDOW  # the window matters
    image = ids == a.image_token_id
    embeds = a.model.get_input_embeddings()(ids)
    embeds[image] = a._visual_rows(fwd.embeds).embeds[0]
    ref = a.model(inputs_embeds=embeds, token_type_ids=image.long()).logits[0, -1].log_softmax(-1)
    cand = [a.continuation_ids(QUESTIONS[0], c)[0] for c in CANDIDATES]
    torch.testing.assert_close(ours, ref[cand], atol=1e-5, rtol=1e-5)


def test_decoders_it_cannot_follow_are_refused_in_one_line():
    """Layer types other than full and sliding-window attention (Qwen3.5's linear attention), or an encoder-style
    Gemma 3 (bidirectional text), are named and refused rather than run with the wrong mask."""
    model, tok = tiny_model("gemma3")
    config = model.model.language_model.config
    config.layer_types = ["linear_attention", "full_attention"]
    with pytest.raises(UserInputError, match=r"^decoder layer types linear_attention are not supported; accepted: "
                                             r"full_attention, sliding_attention$"):
        Gemma3Adapter(model, tok)
    config.layer_types, config.use_bidirectional_attention = ["sliding_attention", "full_attention"], True
    with pytest.raises(UserInputError, match="use_bidirectional_attention=True makes an encoder"):
        Gemma3Adapter(model, tok)


@pytest.mark.parametrize("family", EVERY_FAMILY)
def test_in_llm_attention_rows_equal_the_models_eager_attention(adapters, family):
    """What in-LLM methods score with is the model's own attention: q/k norms (Qwen3, Gemma 3), Gemma 3's sliding
    window and its image tokens attending both ways -- every query row, image rows included."""
    a = adapters[family]
    px = pixels_for(a, batch=1)
    assert_rows_equal_eager_attention(a, px, hf_model_inputs(a, px, QUESTIONS[0]))


def test_gemma3_greedy_answers_equal_the_models_generate(adapters):
    """Cached decoding through the sliding window (the prompt alone outgrows it) gives ``model.generate``'s
    tokens; with a pre-LLM compressor, the uncached path's; with FastV, the re-pruning path's first token."""
    a = adapters["gemma3"]
    px = pixels_for(a, batch=1)
    inputs = hf_model_inputs(a, px, QUESTIONS[0])
    ref = a.model.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    stops = [i for i, t in enumerate(ref) if t in a.stop_ids()]
    ref = ref[:stops[0]] if stops else ref
    ours = a.generate_ids(Target(a, "none").forward(px).embeds, QUESTIONS[:1], 12)[0]
    assert len(ours) >= 4 and ours == ref
    pruned = Target(a, "random", 8, seed=1).forward(pixels_for(a)).embeds
    assert a.generate_ids(pruned, QUESTIONS, 12) == a.generate_ids(pruned, QUESTIONS, 12, cache=False)
    fastv = Target(a, "fastv", 8, **TINY_KWARGS["fastv"]).forward(pixels_for(a))  # prunes once, in the prefill
    cached = a.generate_ids(fastv.embeds, QUESTIONS, 6, in_llm=fastv.in_llm)
    assert [c[:1] for c in cached] == a.generate_ids(fastv.embeds, QUESTIONS, 1, in_llm=fastv.in_llm, cache=False)


@pytest.mark.parametrize("family", EVERY_FAMILY)
def test_in_llm_at_full_budget_is_exact(adapters, family):
    a = adapters[family]
    px = pixels_for(a)
    full = Target(a, "none").candidate_logprobs(px, QUESTIONS, CANDIDATES)
    for name in ("fastv", "pdrop"):
        pruned = Target(a, name, a.num_visual_tokens, **TINY_KWARGS[name]).candidate_logprobs(px, QUESTIONS, CANDIDATES)
        torch.testing.assert_close(pruned, full, atol=1e-6, rtol=1e-6)


def test_deepstack_follows_the_kept_tokens(adapters):
    """Qwen3-VL: a pooled token carries the pooled DeepStack features of its sources."""
    a = adapters["qwen3_vl"]
    px = pixels_for(a, batch=1)
    tokens = a.encode(px)
    assert tokens.aux.shape == (1, 16, 2, 64)
    fwd = Target(a, "pooling", 4).forward(px)
    expected = torch.einsum("kn,nld->kld", fwd.plan.weights[0, :, :16], tokens.aux[0])
    torch.testing.assert_close(fwd.embeds.deepstack[0], expected)
    cached = a.generate_ids(fwd.embeds, QUESTIONS[:1], 4)
    assert cached == a.generate_ids(fwd.embeds, QUESTIONS[:1], 4, cache=False)


# ---------------------------------------------------------------------------------------------- preprocessing
def test_qwen3_patchify_matches_the_hf_processor(adapters):
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    a = adapters["qwen3_vl"]
    image = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    proc = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=16,
                                    max_pixels=4096, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])
    ref = proc(images=Image.fromarray(image), return_tensors="pt")
    torch.testing.assert_close(a.patchify(a.normalize(a.load_image(image))), ref["pixel_values"], atol=1e-5, rtol=0)


def test_internvl_matches_the_hf_processor(adapters):
    from PIL import Image
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    a = adapters["internvl"]
    image = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    proc = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=False,
                                    image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])
    ref = proc(images=Image.fromarray(image), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(a.normalize(a.load_image(image)), ref, atol=1e-5, rtol=0)


def test_gemma3_matches_the_hf_processor(adapters):
    from PIL import Image
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    a = adapters["gemma3"]
    image = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    proc = Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5, 0.4, 0.3],
                                   image_std=[0.2, 0.25, 0.3])
    ref = proc(images=Image.fromarray(image), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(a.normalize(a.load_image(image)), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.project(a.encode(a.load_image(image)).features),  # the model's own image features
                               a.model.get_image_features(ref).pooler_output, atol=1e-5, rtol=1e-5)


def test_onevision_crops_match_the_hf_processor(adapters):
    from PIL import Image
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    a = adapters["llava_onevision"]
    image = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    proc = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32},
                                           image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]],
                                           image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])
    ref = proc(images=Image.fromarray(image), return_tensors="pt")["pixel_values"][0]
    ours = a.normalize(a.crops(a.load_image(image)))
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours[1:], ref[1:], atol=1e-5, rtol=0)  # tiles: exact
    assert (ours[0] - ref[0]).abs().mul(0.25).mean() < 0.02  # base: torch vs PIL bicubic


# ---------------------------------------------------------------------------------------------- compressors
@pytest.mark.parametrize("family", EVERY_FAMILY)
@pytest.mark.parametrize("name", list_compressors())
def test_every_compressor_runs_or_is_refused(adapters, family, name):
    a = adapters[family]
    budget = a.num_visual_tokens if name == "none" else BUDGET[family]
    if name in REFUSED[family]:
        with pytest.raises(UserInputError) as err:
            Target(a, name, budget, **TINY_KWARGS.get(name, {}))
        msg = str(err.value)
        assert len(msg.splitlines()) == 1
        if (family, name) in older.REFUSED_BECAUSE:  # the model, not a missing signal
            assert older.REFUSED_BECAUSE[family, name] in msg
            pytest.skip(f"{family} refuses {name}: {msg}")
        assert name not in compatible_compressors(a)
        assert f"compressor {name!r} needs" in msg and a.family in msg and a.name in msg
        assert f"compatible compressors: {', '.join(compatible_compressors(a))}" in msg
        pytest.skip(f"{family} refuses {name}: {msg}")
    assert name in compatible_compressors(a)
    target = Target(a, name, budget, **TINY_KWARGS.get(name, {}))
    px = pixels_for(a).requires_grad_()
    fwd = target.forward(px)
    loss = a.answer_loss(fwd.embeds, QUESTIONS, ["yes", "red"], in_llm=fwd.in_llm)
    assert torch.isfinite(loss).all()
    if fwd.in_llm is not None:
        assert fwd.in_llm.last_keep.shape == (2, budget)
    else:
        assert fwd.plan.weights.shape == (2, budget, a.num_visual_tokens + 1) and fwd.plan.lengths is None
        if isinstance(fwd.embeds, VisualEmbeds):
            newlines = a.tiles[0] * a.grid[0] if isinstance(a, LlavaNextAdapter) else 0
            assert [len(s) for s in fwd.embeds.sources] == [budget + newlines] * 2
            assert [int((s >= 0).sum()) for s in fwd.embeds.sources] == [budget] * 2
    loss.sum().backward()
    assert px.grad is not None and px.grad.abs().sum() > 0 and torch.isfinite(px.grad).all()


# ---------------------------------------------------------------------------------------------- attacks
@pytest.mark.parametrize("family", EVERY_FAMILY)
@pytest.mark.parametrize("name,kwargs", [("fulltoken", {}), ("cage", {"score": "norm"}), ("known_budget",
                                         {"score": "norm", "budget": 4}), ("stealth", {}), ("cira", {}), ("fata", {})])
def test_attacks_run_or_are_refused_on_every_family(adapters, family, name, kwargs):
    """The recipes' attacks (and the stealth one against a compressed target) run within epsilon on every family;
    CIRA and FATA rank by CLS attention: refused in one line at construction where the model has none."""
    from robustvtc.attacks import get_attack

    a = adapters[family]
    px = pixels_for(a, batch=1)
    if name in ("cira", "fata") and "cls_token" not in a.capabilities:
        with pytest.raises(UserInputError, match=rf"^{name} needs a CLS token .* accepted: a model that has it, or "):
            get_attack(name, a, eps="4/255", steps=1, **kwargs)
        return
    model = Target(a, "pooling", BUDGET[family]) if name == "stealth" else a
    result = get_attack(name, model, eps="4/255", steps=2, random_start=True, **kwargs)(px, QUESTIONS[:1], ["yes"])
    assert result.loss_trace.shape == (3, 1) and torch.isfinite(result.loss_trace).all()
    assert 0 < (result.adv - px).abs().max() <= 4 / 255 + 1e-6
