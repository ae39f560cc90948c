"""Nothing computed twice: a cell's keep map comes from the forward pass that scored it (the compressor -- and
ToMe's encoder run -- once per cell), and a chunk's clean images are decoded once and encoded once for all of its
units (the clean evaluation and every attack's clean reference)."""
from __future__ import annotations

from collections import Counter

import torch

from robustvtc.campaign import Campaign, parse_scenario
from robustvtc.campaign.grid import evaluate_grid, kept_sources, make_target
from robustvtc.compression.tome import ToMe
from robustvtc.data.synthetic import ANSWERS, generate_dataset, to_pixels
from robustvtc.target import EncodingCache, Target


def test_keep_maps_come_from_the_forward_that_scored(tiny_adapter, monkeypatch):
    chunk = generate_dataset(3, "test")
    pixels, questions = to_pixels(chunk), [s.question for s in chunk]
    targets = [make_target(tiny_adapter, c, b) for c, b in [("none", 144), ("visionzip", 16), ("fastervlm", 32),
                                                           ("tome", 72), ("fastv", 16)]]
    forwards, tome_runs = Counter(), []
    forward = Target.forward
    monkeypatch.setattr(Target, "forward", lambda self, *a, **k: (forwards.update([self.compressor.name]),
                                                                  forward(self, *a, **k))[1])
    compress = ToMe.compress_pixels
    monkeypatch.setattr(ToMe, "compress_pixels", lambda self, *a, **k: (tome_runs.append(1),
                                                                        compress(self, *a, **k))[1])
    results = evaluate_grid(targets, pixels, lambda t, px, tok: t.predict(px, questions, ANSWERS, tokens=tok),
                            keep_maps=True)
    assert forwards == {t.compressor.name: 1 for t in targets} and len(tome_runs) == 1
    monkeypatch.setattr(Target, "forward", forward)
    for target, result in zip(targets, results):
        with torch.no_grad():
            plan = target.forward(pixels).plan
            expected = target.predict(pixels, questions, ANSWERS)
        assert result.predictions == expected
        if plan is None:
            assert result.kept is None  # fastv decides inside the LLM
        else:
            assert torch.equal(result.kept, kept_sources(plan))


def test_an_encoding_cache_serves_only_its_own_pixels(tiny_adapter, monkeypatch):
    pixels = to_pixels(generate_dataset(2, "test"))
    cache = EncodingCache(pixels)
    calls = []
    encode = type(tiny_adapter).encode
    monkeypatch.setattr(type(tiny_adapter), "encode", lambda self, *a, **k: (calls.append(1), encode(self, *a, **k))[1])
    wide = cache.encode(tiny_adapter, pixels, (1, 2))
    assert cache.encode(tiny_adapter, pixels, (2,)) is wide and cache.encode(tiny_adapter, pixels.detach(), ()) is wide
    assert len(calls) == 1
    assert cache.encode(tiny_adapter, pixels, (0,)) is not wide  # a layer the entry lacks: encoded again
    assert cache.encode(tiny_adapter, pixels.clone(), ()) is not wide  # other pixels
    assert cache.encode(tiny_adapter, pixels.clone().requires_grad_(True), ()) is not wide
    assert len(calls) == 4
    torch.testing.assert_close(wide.features, encode(tiny_adapter, pixels, (1, 2)).features, rtol=0, atol=0)


def test_a_chunk_is_decoded_once_and_its_clean_images_encoded_once(tiny_adapter, monkeypatch):
    from robustvtc.campaign.tasks import Task

    spec = parse_scenario({"compressors": ["none", "fastervlm", "visionzip"], "budgets": [16, 32], "samples": 4,
                           "batch_size": 2, "steps": 1, "attacks": ["fulltoken", "cage"], "eps": ["4/255", "8/255"]})
    campaign = Campaign(spec, tiny_adapter)
    decoded, clean_encodes = [], Counter()
    pixels = Task.pixels
    monkeypatch.setattr(Task, "pixels", lambda self, *a, **k: (decoded.append(1), pixels(self, *a, **k))[1])
    encode = type(tiny_adapter).encode

    def counting(self, px, *a, **k):
        if campaign._chunk is not None and px.data_ptr() == campaign._chunk[1].data_ptr() and not px.requires_grad:
            clean_encodes[campaign._chunk[0]] += 1
        return encode(self, px, *a, **k)
    monkeypatch.setattr(type(tiny_adapter), "encode", counting)
    units = campaign.units()
    assert len(units) == 2 * 5  # per chunk: clean + 2 attacks x 2 eps
    records = [r for u in units for r in campaign.run_unit(u)]
    assert records and len(decoded) == 2  # one decode per chunk
    assert clean_encodes == {0: 1, 1: 1}  # the clean grid's pass, read again by all 4 attack references
