"""Every vision tower a transformers LLaVA can hold -- CLIP, SigLIP (no CLS), ViT, DeiT (distillation token),
DINOv2 with and without registers -- read through the one tower mechanism: tiny random models saved with
save_pretrained and loaded by load_model(path), offline."""
from __future__ import annotations

import json

import pytest
import torch

from robustvtc.compression import check_compatible, compatible_compressors, get_compressor
from robustvtc.errors import UserInputError
from robustvtc.models import load_model
from robustvtc.models.towers import load_encoder
from robustvtc.target import Target

from test_real_adapters import CANDIDATES, LLAVA_SPECIAL, QUESTIONS, eager_attentions, tiny_tokenizer

SMALL = dict(image_size=32, patch_size=8, num_hidden_layers=3, hidden_size=32, num_attention_heads=4)
# tower -> (config class, extra config, LLaVA feature strategy, non-patch tokens the LLM reads, has CLS)
TOWERS = {
    "clip": ("CLIPVisionConfig", dict(intermediate_size=64), "default", 0, True),
    "siglip": ("SiglipVisionConfig", dict(intermediate_size=64), "full", 0, False),
    "vit": ("ViTConfig", dict(intermediate_size=64), "default", 0, True),
    "deit": ("DeiTConfig", dict(intermediate_size=64), "default", 1, True),
    "dinov2": ("Dinov2Config", dict(mlp_ratio=2), "default", 0, True),
    "dinov2_registers": ("Dinov2WithRegistersConfig", dict(mlp_ratio=2, num_register_tokens=4), "default", 4, True),
}


def tiny_llava(tower: str):
    import transformers as T

    config_class, extra, strategy, _, _ = TOWERS[tower]
    tok, vocab = tiny_tokenizer(LLAVA_SPECIAL, "<s>")
    vision = getattr(T, config_class)(**SMALL, **extra)
    text = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3)
    cfg = T.LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab["<image>"],
                        vision_feature_layer=-2, vision_feature_select_strategy=strategy,
                        image_seq_length=16 + TOWERS[tower][3] + (strategy == "full" and TOWERS[tower][4]))
    torch.manual_seed(0)
    model = T.LlavaForConditionalGeneration(cfg)
    with torch.no_grad():  # random non-zero registers / distillation token, so their place matters
        for name, p in model.named_parameters():
            if "register_tokens" in name or "distillation_token" in name or "cls_token" in name:
                p.normal_()
    return model, tok


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for tower in TOWERS:
        model, tok = tiny_llava(tower)
        path = tmp_path_factory.mktemp(tower)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        (path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.4, 0.3],
                                                                   "image_std": [0.2, 0.25, 0.3]}))
        out[tower] = path
    return out


@pytest.fixture(scope="module")
def adapters(saved):
    return {t: load_model(str(p)) for t, p in saved.items()}


def pixels(batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("tower", TOWERS)
def test_all_tokens_give_the_models_own_logits(adapters, tower):
    a = adapters[tower]
    px = pixels()
    tokens = a.encode(px)
    assert tokens.features.shape[:2] == (2, 16) and tokens.grid == (4, 4)
    assert (tokens.cls is not None) == TOWERS[tower][4]
    ours = Target(a, "none").candidate_logprobs(px, QUESTIONS, CANDIDATES)
    count = a.model.config.image_seq_length  # the patches plus what transformers feeds besides them
    for b, q in enumerate(QUESTIONS):
        text = a.prompt_template.format(question=q).replace("<image>", "<image>" * count)
        ids = a.tokenizer(text, return_tensors="pt").input_ids
        ref = a.model(input_ids=ids, pixel_values=a.normalize(px[b:b + 1])).logits[0, -1].log_softmax(-1)
        cand = [a.continuation_ids(q, c)[0] for c in CANDIDATES]
        torch.testing.assert_close(ours[b], ref[cand], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tower", [t for t in TOWERS if TOWERS[t][4]])
def test_cls_row_equals_eager_attention(adapters, tower):
    a = adapters[tower]
    px = pixels()
    tokens = a.encode(px, signal_layers=(0,))
    attentions = eager_attentions(a.model.model.vision_tower, pixel_values=a.normalize(px))
    first_patch = 1 + TOWERS[tower][3]
    for layer in (0, a.feature_layer):
        ref = attentions[layer][:, :, 0, first_patch:]
        torch.testing.assert_close(tokens.cls_attention(layer, reduce="none"), ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(tokens.keys(reduce="none").shape[2], 16)


@pytest.mark.parametrize("tower", TOWERS)
def test_compressed_path_runs_and_reaches_the_pixels(adapters, tower):
    a = adapters[tower]
    name = "fastervlm" if TOWERS[tower][4] else "divprune"
    px = pixels().requires_grad_(True)
    Target(a, name, 6).answer_loss(px, QUESTIONS, ["yes", "no"]).sum().backward()
    assert px.grad.abs().sum() > 0


def test_tower_without_cls_refuses_cls_methods(adapters):
    a = adapters["siglip"]
    assert "cls_token" not in a.capabilities
    names = compatible_compressors(a)
    assert "fastervlm" not in names and "visionzip" not in names and "divprune" in names
    with pytest.raises(UserInputError, match=r"compressor 'fastervlm' needs a CLS token .*compatible compressors: "):
        check_compatible(a, get_compressor("fastervlm"), 6)
    from robustvtc.attacks import get_attack
    from robustvtc.attacks.base import importance

    tokens = a.encode(pixels(1))
    with pytest.raises(UserInputError, match=r"CLS token.*accepted: a score without it \(score='norm'"):
        importance(tokens, "attention")
    assert importance(tokens, "norm").shape == (1, 16)
    with pytest.raises(UserInputError, match="score='norm'"):
        get_attack("cage", a, eps="4/255", steps=1)(pixels(1), QUESTIONS[:1], ["yes"])
    get_attack("cage", a, eps="4/255", steps=1, score="norm")(pixels(1), QUESTIONS[:1], ["yes"])


def test_only_clip_offers_the_encoder_rerun(adapters):
    assert "encoder_rerun" in adapters["clip"].capabilities
    for tower in ("vit", "deit", "dinov2", "dinov2_registers"):
        assert adapters[tower].capabilities == {"cls_token"}


def test_lead_tokens_are_never_compressed(adapters):
    a = adapters["dinov2_registers"]
    fwd = Target(a, "fastervlm", 6).forward(pixels())
    assert [len(e) for e in fwd.embeds.embeds] == [4 + 6, 4 + 6]
    assert fwd.embeds.sources[0][:4].tolist() == [-1] * 4 and bool((fwd.embeds.sources[0][4:] >= 0).all())


def test_unreadable_tower_is_refused_at_load(tmp_path):
    import transformers as T

    tok, vocab = tiny_tokenizer(LLAVA_SPECIAL, "<s>")
    vision = T.Siglip2VisionConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                   patch_size=8, num_patches=16)
    text = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    cfg = T.LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab["<image>"],
                        vision_feature_select_strategy="full", image_seq_length=16)
    T.LlavaForConditionalGeneration(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(UserInputError, match=r"^vision tower Siglip2VisionModel \(model_type 'siglip2_vision_model'\) "
                                             r"is not one robustvtc can read; accepted: CLIP, SigLIP, ViT, DeiT"):
        load_model(str(tmp_path))


def test_siglip_under_default_strategy_is_refused(saved, tmp_path):
    import shutil

    shutil.copytree(saved["siglip"], tmp_path, dirs_exist_ok=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["vision_feature_select_strategy"] = "default"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserInputError, match="drops token 0, which in this SigLIP tower .no CLS. is a patch"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("tower", ["vit", "dinov2_registers", "siglip"])
def test_bare_encoder_reads_like_the_lvlm_tower(adapters, tower):
    a = adapters[tower]
    enc = load_encoder(a.model.model.vision_tower, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])
    px = pixels()
    ours, theirs = enc.encode(px, signal_layers=(0,)), a.encode(px, signal_layers=(0,))
    assert enc.input_size == (32, 32) and enc.feature_layer == a.feature_layer
    torch.testing.assert_close(ours.features, theirs.features)
    if theirs.cls is not None:
        torch.testing.assert_close(ours.cls_attention(0), theirs.cls_attention(0))


def test_load_encoder_from_a_classifier_checkpoint(tmp_path):
    import transformers as T

    torch.manual_seed(0)
    clf = T.ViTForImageClassification(T.ViTConfig(**SMALL, intermediate_size=64, num_labels=3))
    clf.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.485, 0.456, 0.406],
                                                                   "image_std": [0.229, 0.224, 0.225]}))
    enc = load_encoder(str(tmp_path))
    px = pixels()
    tokens = enc.encode(px)
    with torch.no_grad():
        want = clf.vit(pixel_values=enc.normalize(px), output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(tokens.features, want[:, 1:])
    torch.testing.assert_close(tokens.cls, want[:, 0])
    assert enc.capabilities == {"cls_token"} and tokens.cls_attention().shape == (2, 16)
    T.BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=8).save_pretrained(tmp_path / "bert")
    with pytest.raises(UserInputError, match="model_type 'bert' is not a vision encoder robustvtc can read"):
        load_encoder(str(tmp_path / "bert"))
