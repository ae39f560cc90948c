"""Real-checkpoint adapters (LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL) on tiny random models saved with
save_pretrained and loaded through load_model(path), offline: their family-specific behaviour, and the tiny
models and helpers that tests/test_new_adapters.py runs every family's exactness checks with; real-data loaders;
answer metrics."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from robustvtc.data.loaders import load_multiple_choice, load_pixels, load_vqa_folder, load_vqa_jsonl
from robustvtc.errors import UserInputError
from robustvtc.models import (Gemma3Adapter, LlavaAdapter, LlavaNextAdapter, Qwen25VLAdapter, Qwen2VLAdapter,
                              load_model)
from robustvtc.scoring import exact_match, normalize_answer, option_logprobs, vqa_accuracy
from robustvtc.target import Target

FAMILIES = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"]
WORDS = ["user", ":", "assistant", "system", "you", "are", "a", "helpful", ".", "what", "color", "is", "the",
         "circle", "?", "yes", "no", "red", "blue", "answer", "with", "option's", "letter", "from", "given",
         "choices", "directly", "b", "c", "q", "'"]
QUESTIONS = ["what color is the circle ?", "is the circle red ?"]  # different lengths: batches left-pad
CANDIDATES = ["yes", "no", "red"]
LLAVA_SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
QWEN_SPECIAL = ["<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
# the tiny LLMs have 2 layers: in-LLM methods prune before layer 1 (scored with layer 0)
TINY_KWARGS = {"fastv": {"layer": 1}, "dart": {"layer": 1}, "sparsevlm": {"layer": 1}, "pdrop": {"layers": (1,)},
               "vscan": {"shallow_layer": 0, "window": 2}, "hiprune": {"object_layer": 1},
               "tokencarve": {"layer": 1}}
BUDGET = {"llava": 8, "llava_next": 10, "qwen2_vl": 8, "qwen2_5_vl": 8}  # next: 5 crops x 2
REFUSED = {"llava": {"flowcut", "visionzip_qwen"}, "llava_next": {"tome", "flowcut", "visionzip_qwen"},
           "qwen2_vl": {"fastervlm", "visionzip", "vispruner", "prumerge", "prumerge_plus", "tome", "flowcut", "vscan",
                        "hiprune"}}
# why, where the model cannot run it for a reason other than a missing signal
REFUSED_BECAUSE = {("llava", "flowcut"): "this encoder's feature layer is its first"}
REFUSED["qwen2_5_vl"] = REFUSED["qwen2_vl"]


def tiny_tokenizer(special: list[str], bos: str | None):
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys([*special, *WORDS]))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    tok.add_special_tokens(special)
    if bos:
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token=bos,
                                       eos_token="</s>"), vocab
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", unk_token="<unk>",
                                   eos_token="<|im_end|>"), vocab


def tiny_model(family: str):
    """A 2-layer, width-64 random model of ``family`` and its tokenizer."""
    import transformers as T

    if family.startswith("llava"):
        tok, vocab = tiny_tokenizer(LLAVA_SPECIAL, "<s>")
        vision = T.CLIPVisionConfig(image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=64,
                                    intermediate_size=128, num_attention_heads=4, projection_dim=64)
        text = T.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             pad_token_id=0, bos_token_id=2, eos_token_id=3)
        common = dict(vision_config=vision, text_config=text, image_token_index=vocab["<image>"],
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
        if family == "llava":
            return T.LlavaForConditionalGeneration(T.LlavaConfig(**common, image_seq_length=16)), tok
        cfg = T.LlavaNextConfig(**common, image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
        return T.LlavaNextForConditionalGeneration(cfg), tok
    tok, vocab = tiny_tokenizer(QWEN_SPECIAL, None)
    text = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, bos_token_id=3, eos_token_id=3, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    ids = dict(image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
               vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"])
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=64, hidden_size=64, num_heads=4, patch_size=4, spatial_merge_size=2,
                      temporal_patch_size=2, mlp_ratio=2)
        return T.Qwen2VLForConditionalGeneration(T.Qwen2VLConfig(vision_config=vision, text_config=text, **ids)), tok
    # window of 2 x 2 merged tokens (16 px), full attention in block 1: the window reordering is exercised
    vision = dict(depth=2, hidden_size=64, out_hidden_size=64, intermediate_size=128, num_heads=4, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1])
    return T.Qwen2_5_VLForConditionalGeneration(T.Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids)), tok


def save_tiny(make, families, tmp_path_factory) -> dict:
    """family -> directory of a saved tiny checkpoint (``make(family)``'s model and tokenizer, and a
    preprocessor_config.json with a non-CLIP normalisation, so reading it is tested)."""
    out = {}
    for family in families:
        torch.manual_seed(0)
        model, tok = make(family)
        path = tmp_path_factory.mktemp(family)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        (path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.4, 0.3],
                                                                   "image_std": [0.2, 0.25, 0.3]}))
        out[family] = path
    return out


def load_tiny(saved: dict) -> dict:
    """family -> adapter loaded through load_model(path); Qwen's dynamic resolution fixed at 32 px."""
    return {f: load_model(str(p), image_size=32 if f.startswith("qwen") else None) for f, p in saved.items()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_tiny(tiny_model, FAMILIES, tmp_path_factory)


@pytest.fixture(scope="module")
def adapters(saved):
    return load_tiny(saved)


def pixels_for(adapter, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, *adapter.input_size, generator=torch.Generator().manual_seed(seed))


def hf_model_inputs(a, pixels: torch.Tensor, question: str, image_tokens: int | None = None) -> dict:
    """What the transformers model's own forward takes, as its processor gives it: input_ids with the image's
    placeholders (``image_tokens``, else every visual token and LLaVA-NeXT's row newlines) and the pixel inputs."""
    count = a.num_visual_tokens
    if isinstance(a, LlavaNextAdapter):  # and LLaVA-OneVision
        count += a.tiles[0] * a.grid[0]  # one newline per high-resolution row
        inputs = dict(pixel_values=a.normalize(a.crops(pixels)).unsqueeze(0), image_sizes=torch.tensor([a.image_size]))
    elif isinstance(a, Qwen2VLAdapter):
        thw = torch.tensor([[1, a.grid[0] * a.merge, a.grid[1] * a.merge]])
        inputs = dict(pixel_values=a.patchify(a.normalize(pixels)), image_grid_thw=thw)
    else:
        inputs = dict(pixel_values=a.normalize(pixels))
    count = count if image_tokens is None else image_tokens
    text = a.prompt_template.format(question=question).replace(a.image_placeholder, a.image_placeholder * count)
    ids = a.tokenizer(text, return_tensors="pt").input_ids
    if isinstance(a, Qwen2VLAdapter):
        inputs["mm_token_type_ids"] = (ids == a.image_token_id).int()
    if isinstance(a, Gemma3Adapter):  # the image's tokens attend both ways
        inputs["token_type_ids"] = (ids == a.image_token_id).long()
    return dict(input_ids=ids, **inputs)


class CaptureRows:
    """An in-LLM hook at layer 1 that keeps every visual token and records the attention rows of every query."""

    layers, position_policy = (1,), "original"

    def select(self, ctx):
        every = torch.arange(ctx.hidden.shape[1]).expand(ctx.hidden.shape[0], -1)
        self.rows = ctx.attention_rows(every), ctx.current_attention_rows(every)
        return torch.arange(ctx.visual_index.shape[1]).expand(ctx.visual_index.shape[0], -1), None


def eager_attentions(model, forward=None, **inputs) -> tuple[torch.Tensor, ...]:
    """The softmax attention maps ``model`` computes with its eager implementation, per layer (``forward``: the
    submodule to call, default the model), SDPA restored after -- the reference for attention read without them."""
    model.set_attn_implementation("eager")
    try:
        return (forward or model)(**inputs, output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")


def assert_rows_equal_eager_attention(a, pixels: torch.Tensor, inputs: dict) -> None:
    """The attention rows in-LLM methods score with (layers 0 and 1, every query) = the model's eager attention."""
    hook = CaptureRows()
    a.hidden_states(Target(a, "none").forward(pixels).embeds, QUESTIONS[:1], in_llm=hook)
    for ours, theirs in zip(hook.rows, eager_attentions(a.model, **inputs)):
        torch.testing.assert_close(ours[0], theirs[0].mean(0), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("family,cls", [("llava", LlavaAdapter), ("llava_next", LlavaNextAdapter),
                                        ("qwen2_vl", Qwen2VLAdapter), ("qwen2_5_vl", Qwen25VLAdapter)])
def test_load_model_dispatches_on_model_type(adapters, family, cls):
    a = adapters[family]
    assert type(a) is cls and a.family == family
    assert a.pixel_space["normalization"]["mean"] == pytest.approx([0.5, 0.4, 0.3])  # read from the checkpoint
    assert a.pixel_space["range"] == [0.0, 1.0] and a.pixel_space["resolution"] == list(a.input_size)
    assert a.prompt_source == "default"  # the tiny tokenizers have no chat template


def test_unknown_model_type_is_refused(tmp_path):
    from transformers import CLIPVisionConfig

    CLIPVisionConfig().save_pretrained(tmp_path)
    with pytest.raises(UserInputError, match="has no adapter; accepted: llava, llava_next, qwen2_vl, qwen2_5_vl"):
        load_model(str(tmp_path))


def test_chat_template_gives_the_prompt(saved, tmp_path):
    import shutil

    shutil.copytree(saved["llava"], tmp_path, dirs_exist_ok=True)
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
        "<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %} q:{% endif %}")
    a = load_model(str(tmp_path))
    assert a.prompt_source == "chat_template"
    assert a.prompt_template == "user: <image>\n{question} q:"
    assert load_model(str(tmp_path), prompt_template="<image> {question} a").prompt_source == "argument"


@pytest.mark.parametrize("family,size,match", [
    ("llava_next", (32, 96), "not one of the model's image_grid_pinpoints; accepted: 32x64, 64x32, 64x64"),
    ("qwen2_vl", 30, "multiples of 8"),
])
def test_bad_image_size(saved, family, size, match):
    with pytest.raises(UserInputError, match=match):
        load_model(str(saved[family]), image_size=size)


def test_incompatible_compressor_message(adapters):
    a = adapters["qwen2_vl"]
    with pytest.raises(UserInputError, match=r"compressor 'visionzip' needs a CLS token in the vision encoder .*"
                                             r"which the qwen2_vl model .* does not have; compatible compressors: "
                                             r"dart, divprune, fastv, none, pdrop, pooling, random, sparsevlm, "
                                             r"tokencarve, visionzip_qwen$"):
        Target(a, "visionzip", 8)
    with pytest.raises(UserInputError, match="needs the vision encoder.s CLS token, and this model.s encoder has none"):
        a.encode(pixels_for(a)).cls_attention()


def test_llava_next_splits_the_budget_over_crops(adapters):
    a = adapters["llava_next"]
    with pytest.raises(UserInputError, match=r"split over 5 crops; accepted: 5\.\.80"):
        Target(a, "fastervlm", 4)
    fwd = Target(a, "fastervlm", 12).forward(pixels_for(a, batch=1))
    kept = fwd.plan.primary_sources()[0]
    per_crop = torch.bincount(a.crop_order[kept] // 16, minlength=5)
    assert per_crop.tolist() == [3, 3, 2, 2, 2]  # base first takes the remainder
    src = fwd.embeds.sources[0]
    # base tokens first; high-resolution rows in order, each closed by a newline (-1)
    assert (src[:3] < 16).all() and (src == -1).sum() == 8 and src[-1] == -1
    high = src[3:][src[3:] >= 0]
    assert (high.diff() > 0).all()


def test_llava_next_tokens_follow_the_llm_order(adapters):
    """VisualTokens of LLaVA-NeXT = what transformers packs (before the projector, newlines aside)."""
    a = adapters["llava_next"]
    px = pixels_for(a, batch=1)
    tokens = a.encode(px)
    packed = a.model.model.get_image_features(pixel_values=a.normalize(a.crops(px)).unsqueeze(0),
                                              image_sizes=torch.tensor([a.image_size])).pooler_output[0]
    ours, sources = a._plain_layout(a.project(tokens.features)[0])
    torch.testing.assert_close(ours, packed, atol=1e-6, rtol=1e-6)
    assert tokens.cls_attention().shape == (1, 80) and tokens.crop(3).features.shape == (1, 16, 64)
    torch.testing.assert_close(tokens.crop(0).features, tokens.features[:, :16])


# ---------------------------------------------------------------------------------------------- preprocessing
def test_qwen_patchify_matches_the_hf_processor(adapters):
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    a = adapters["qwen2_vl"]
    image = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    proc = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=16,
                                    max_pixels=4096, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])
    ref = proc(images=Image.fromarray(image), return_tensors="pt")
    assert ref["image_grid_thw"].tolist() == [[1, 8, 8]]
    torch.testing.assert_close(a.patchify(a.normalize(a.load_image(image))), ref["pixel_values"], atol=1e-5, rtol=0)


def test_llava_next_crops_match_the_hf_processor(adapters):
    from PIL import Image
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    a = adapters["llava_next"]
    image = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    proc = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                      image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]],
                                      image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])
    ref = proc(images=Image.fromarray(image), return_tensors="pt")["pixel_values"][0]
    ours = a.normalize(a.crops(a.load_image(image)))
    torch.testing.assert_close(ours[1:], ref[1:], atol=1e-5, rtol=0)  # tiles: exact
    assert (ours[0] - ref[0]).abs().mul(0.25).mean() < 0.02  # base: torch vs PIL bicubic, within 2 % of range


def test_load_image_resizes_and_centre_crops(adapters, tmp_path):
    from PIL import Image

    a = adapters["llava_next"]
    wide = np.zeros((40, 120, 3), np.uint8)
    wide[:, 50:70] = 255  # a white band in the middle sixth: crop columns 16..48
    Image.fromarray(wide).save(tmp_path / "wide.png")
    px = a.load_image(tmp_path / "wide.png")
    assert px.shape == (1, 3, 64, 64) and 0 <= px.min() and px.max() <= 1
    assert px[..., 16:48].mean() > 0.9 and px[..., :4].mean() < 0.1  # the crop keeps the centre


# ---------------------------------------------------------------------------------------------- data loaders
@pytest.fixture
def images(tmp_path):
    from PIL import Image

    for name in ("a.png", "b.png"):
        Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / name)
    return tmp_path


def test_vqa_jsonl(images, adapters):
    lines = [{"image": "a.png", "question": "what color ?", "answers": ["red"] * 3 + ["dark red"]},
             {"id": "q2", "image": str(images / "b.png"), "question": "is it red ?", "answer": "yes"}]
    path = images / "vqa.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    items = load_vqa_jsonl(path)
    assert [i.id for i in items] == ["1", "q2"] and items[0].image == images / "a.png"
    assert items[0].answers == ("red", "red", "red", "dark red") and items[1].answers == ("yes",)
    px = load_pixels(items, adapters["qwen2_vl"])
    assert px.shape == (2, 3, 32, 32) and px[:, 0].mean() > 0.7


def test_vqa_folder_csv(images):
    (images / "questions.csv").write_text("image,question,answers\na.png,what color ?,red|red|dark red\n"
                                          "b.png,\"is it red, really ?\",yes\n")
    items = load_vqa_folder(images)
    assert items[0].answers == ("red", "red", "dark red") and items[1].question == "is it red, really ?"
    assert items[1].id == "3"  # the CSV line


def test_multiple_choice_jsonl_and_csv(images):
    (images / "mc.jsonl").write_text(json.dumps({"image": "a.png", "question": "colour ?",
                                                 "options": ["red", "blue", "green"], "answer": "b"}) + "\n"
                                     + json.dumps({"image": "b.png", "question": "shape ?",
                                                   "options": ["circle", "square"], "answer": 0}) + "\n")
    items = load_multiple_choice(images / "mc.jsonl")
    assert [(i.options, i.answer, i.letter) for i in items] == [(("red", "blue", "green"), 1, "B"),
                                                                (("circle", "square"), 0, "A")]
    (images / "mc.csv").write_text("image,question,A,B,C,D,answer\na.png,colour ?,red,blue,green,,C\n"
                                   "b.png,shape ?,circle,square,,,1\n")
    items = load_multiple_choice(images / "mc.csv")
    assert [(i.options, i.answer) for i in items] == [(("red", "blue", "green"), 2), (("circle", "square"), 1)]


@pytest.mark.parametrize("content,match", [
    ("{not json\n", r"vqa\.jsonl:1: not valid JSON"),
    ('["a.png"]\n', "expected a JSON object, got list"),
    ('{"image": "a.png", "answers": ["x"]}\n', r"vqa\.jsonl:1: field 'question' missing"),
    ('{"image": "a.png", "question": "q"}\n', "answers must be a non-empty list"),
    ('{"image": "a.png", "question": "q", "answers": []}\n', "answers must be a non-empty list"),
    ('{"image": "a.png", "question": "q", "answers": ["x", 3]}\n', "answers must be a non-empty list"),
    ('{"image": "zz.png", "question": "q", "answers": ["x"]}\n', "image file not found: .*zz.png"),
    ('{"image": "a.png", "question": "", "answers": ["x"]}\n', "'question' must be a non-empty string"),
    ("\n", "holds no items"),
])
def test_bad_vqa_jsonl_is_refused(images, content, match):
    (images / "vqa.jsonl").write_text(content)
    with pytest.raises(UserInputError, match=match) as err:
        load_vqa_jsonl(images / "vqa.jsonl")
    assert "\n" not in str(err.value)  # one line


@pytest.mark.parametrize("content,match", [
    ("image,question\na.png,q\n", "lacks column.*answers or answer; accepted: CSV columns"),
    ("picture,question,answer\na.png,q,x\n", "lacks column.*image"),
    ("image,question,answer\na.png,q,x,extra\n", r"questions\.csv:2: more fields than columns"),
    ("image,question,answer\na.png,q,\n", "answers must be a non-empty list"),
])
def test_bad_vqa_csv_is_refused(images, content, match):
    (images / "questions.csv").write_text(content)
    with pytest.raises(UserInputError, match=match):
        load_vqa_folder(images)


@pytest.mark.parametrize("row,match", [
    ({"options": ["x"], "answer": 0}, "options must be a list of 2..26"),
    ({"options": ["x", "y"], "answer": "C"}, "answer 'C' is not one of the 2 options; accepted: a letter A..B"),
    ({"options": ["x", "y"], "answer": 2}, "answer 2 is not one of the 2 options"),
    ({"options": ["x", "y"], "answer": True}, "answer True is not one of"),
    ({"options": ["x", "y"]}, "answer None"),
])
def test_bad_multiple_choice_is_refused(images, row, match):
    (images / "mc.jsonl").write_text(json.dumps({"image": "a.png", "question": "q", **row}) + "\n")
    with pytest.raises(UserInputError, match=match):
        load_multiple_choice(images / "mc.jsonl")


def test_missing_data_files(tmp_path):
    with pytest.raises(UserInputError, match="data file not found: .*nope.jsonl; accepted: one JSON object per line"):
        load_vqa_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(UserInputError, match="image folder not found"):
        load_vqa_folder(tmp_path / "nope")
    (tmp_path / "mc.csv").write_text("image,question,A,answer\n")
    with pytest.raises(UserInputError, match="lacks column.*B"):
        load_multiple_choice(tmp_path / "mc.csv")


# ---------------------------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("raw,normal", [
    ("Two", "2"), ("the dog.", "dog"), ("A cat, dog", "cat dog"), ("yes!", "yes"), ("1,000", "1000"),
    ("it is 2.5", "it is 2.5"), ("x-ray", "x ray"), ("dont know", "don't know"), ("couldnt've", "couldn't've"),
    ("  Red\tcar\n", "red car"), ("(left)", "left"), ("none", "0"),
])
def test_vqa_normalisation(raw, normal):
    assert normalize_answer(raw) == normal


def test_vqa_accuracy_and_exact_match():
    humans = ["2"] * 2 + ["two"] + ["3"] * 7
    assert vqa_accuracy("two", humans) == 1.0  # three humans after normalisation
    assert vqa_accuracy("2", ["2", "2"] + ["3"] * 8) == pytest.approx(2 / 3)
    assert vqa_accuracy("four", humans) == 0.0
    assert exact_match("The Dog.", ["dog"]) == 1.0 and exact_match("dogs", ["dog"]) == 0.0
    with pytest.raises(UserInputError, match="non-empty list of strings"):
        vqa_accuracy("x", "x")


def test_option_logprobs_by_letter_and_text(adapters):
    a = adapters["llava"]
    target = Target(a, "fastervlm", 8)
    px = pixels_for(a)
    by_letter = option_logprobs(target, px, ["what color is the circle ?"] * 2, [["red", "blue", "yes"], ["yes", "no"]])
    assert by_letter.shape == (2, 3) and torch.isinf(by_letter[1, 2]) and torch.isfinite(by_letter[:, :2]).all()
    by_text = option_logprobs(target, px, QUESTIONS, [["red", "blue"], ["yes", "no"]], by="text")
    ref = target.candidate_logprobs(px[:1], QUESTIONS[:1], ["red", "blue"])[0]
    torch.testing.assert_close(by_text[0], ref)
