"""The vision encoder runs only up to the deepest layer anything reads (the feature layer, or a deeper signal
layer's attention input), and what it gives is exactly what the whole tower gives: features, CLS, non-patch
tokens, signals, gradients and the answers' log-probabilities."""
from __future__ import annotations

import pytest
import torch

from robustvtc.models.llava import LlavaAdapter
from robustvtc.models.towers import load_encoder
from robustvtc.target import Target

from test_towers import TOWERS, tiny_llava


def pixels(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def full_run(adapter, px, layers):
    """The reference: the whole tower with every hidden state, read at the feature layer."""
    hidden, captured = adapter.reader.run(adapter.normalize(px), (adapter.feature_layer, *layers))
    return hidden[adapter.feature_layer + 1], captured


def calls(module: torch.nn.Module) -> list:
    seen = []
    module.register_forward_hook(lambda *args: seen.append(1))
    return seen


@pytest.fixture(scope="module")
def llavas():
    return {t: LlavaAdapter(*tiny_llava(t)) for t in TOWERS}


@pytest.mark.parametrize("tower", TOWERS)
@pytest.mark.parametrize("layers", [(), (0,), (-1,)], ids=["feature", "earlier", "deeper"])
def test_stopping_at_the_deepest_layer_read_changes_nothing(llavas, tower, layers):
    a = llavas[tower]
    assert a.feature_layer == 1 and a.num_vision_layers == 3  # vision_feature_layer -2 of 3 layers
    px = pixels()
    hidden, signals = full_run(a, px, layers)
    last_mlp = calls(a.reader.layers[-1])
    last_attention = calls(a.reader.attention[-1])
    tokens = a.encode(px, layers)
    assert not last_mlp and not last_attention  # layer 2 never ran (its input is read for -1, nothing more)
    cls, _, patches = a.reader.split(hidden)
    assert torch.equal(tokens.features, patches)
    assert (tokens.cls is None) == (cls is None) and (cls is None or torch.equal(tokens.cls, cls))
    lead = hidden[:, a._lead_from:a.reader.num_prefix]
    assert (tokens.lead is None) == (lead.shape[1] == 0)
    if tokens.lead is not None:
        assert torch.equal(tokens.lead, lead)
    assert sorted(tokens.signals) == sorted(signals) == sorted({1, *(i % 3 for i in layers)})
    for i, s in signals.items():
        assert torch.equal(tokens.signals[i].queries, s.queries) and torch.equal(tokens.signals[i].keys, s.keys)
        assert (s.extra_keys is None) == (tokens.signals[i].extra_keys is None)


@pytest.mark.parametrize("tower", ["clip", "dinov2_registers"])
def test_gradients_and_answers_are_those_of_the_whole_tower(llavas, tower):
    a = llavas[tower]
    target = Target(a, "none")
    questions, candidates = ["what color is the circle ?"] * 2, ["red", "blue"]
    px = pixels().requires_grad_(True)
    tokens = a.encode(px, (-1,))
    hidden, _ = full_run(a, px, (-1,))
    _, _, patches = a.reader.split(hidden)
    grad_cut, = torch.autograd.grad(tokens.features.square().sum() + tokens.signals[2].keys.sum(), px)
    _, full_signals = full_run(a, px, (-1,))
    grad_full, = torch.autograd.grad(patches.square().sum() + full_signals[2].keys.sum(), px)
    torch.testing.assert_close(grad_cut, grad_full, rtol=1e-4, atol=1e-5)  # float32 sums, any order
    with torch.no_grad():
        cut = target.candidate_logprobs(px, questions, candidates)
        hidden, captured = full_run(a, px, ())
        cls, _, patches = a.reader.split(hidden)
        lead = hidden[:, a._lead_from:a.reader.num_prefix]
        ref_tokens = type(tokens)(patches, cls, a.grid, a.feature_layer, captured, a.num_vision_layers,
                                  lead=lead if lead.shape[1] else None)
        full = target.candidate_logprobs(px, questions, candidates, tokens=ref_tokens)
    assert torch.equal(cut, full)


def test_a_bare_encoder_stops_at_its_feature_layer(llavas):
    tower = llavas["vit"].model.model.vision_tower
    enc = load_encoder(tower, feature_layer=-3)  # layer 0's output: layers 1 and 2 never run
    later = [calls(layer) for layer in enc.reader.layers[1:]]
    px = pixels()
    tokens = enc.encode(px, (0,))
    assert not any(later)
    hidden, _ = enc.reader.run(enc.normalize(px), (0,))
    assert torch.equal(tokens.features, hidden[1][:, 1:])


def test_internvl_stops_at_an_earlier_feature_layer():
    from robustvtc.models.internvl import InternVLAdapter

    from test_new_adapters import tiny_model

    model, tok = tiny_model("internvl")
    model.config.vision_feature_layer = -2  # layer 0 of 2
    a = InternVLAdapter(model, tok)
    tower = model.model.vision_tower
    last = calls(tower.encoder.layer[-1])
    px = pixels(2, a.image_size)
    tokens = a.encode(px)
    assert not last
    with torch.no_grad():
        hidden = tower(pixel_values=a.normalize(px), output_hidden_states=True).hidden_states[-2][:, 1:]
    b, n, d = hidden.shape
    side = int(n ** 0.5)
    shuffled = model.model.pixel_shuffle(hidden.reshape(b, side, side, d), scale_factor=a.ratio)
    assert torch.equal(tokens.features, shuffled.reshape(b, -1, shuffled.shape[-1]))
