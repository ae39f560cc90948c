"""The built-in model's training recipe: the visibility curriculum shows what it claims, and a tiny run
writes weights that load through the public loader."""
import json

import torch

from robustvtc.data import synthetic as S
from robustvtc.training import (TrainConfig, _alignment_loss, _collate, _patch_cells, _stage2_indices, _visible_indices,
                                train_builtin)


def _batch(n=12):
    return _collate([S.generate_sample(i, "train") for i in range(n)])


def test_pair_phase_shows_the_referents_and_one_whole_other_object():
    batch = _batch()
    idx = _visible_indices(batch, "pair", torch.Generator().manual_seed(0))
    for b in range(idx.shape[0]):
        shown = set(idx[b].tolist())
        assert idx[b].tolist() == sorted(shown)  # raster order, no repeats
        refs = set(batch["referent_mask"][b].nonzero().flatten().tolist())
        assert refs <= shown
        ids = batch["object_id"][b]
        ref_objects = set(ids[batch["referent_mask"][b]].tolist()) - {-1}
        all_others = set(ids[ids >= 0].tolist()) - ref_objects
        whole = {o for o in all_others if set((ids == o).nonzero().flatten().tolist()) <= shown}
        assert len(whole) >= min(1, len(all_others))


def test_objects_phase_shows_every_object_patch():
    batch = _batch()
    idx = _visible_indices(batch, "objects", torch.Generator().manual_seed(0))
    for b in range(idx.shape[0]):
        assert set(batch["object_mask"][b].nonzero().flatten().tolist()) <= set(idx[b].tolist())


def test_curriculum_phases_follow_the_fractions():
    cfg = TrainConfig(steps=100, pair_fraction=0.3, objects_fraction=0.2, drop_prob=0.0)
    batch, gen = _batch(4), torch.Generator().manual_seed(0)
    pair = _stage2_indices(batch, 29, cfg, 144, gen)
    objects = _stage2_indices(batch, 30, cfg, 144, gen)
    assert pair.shape[1] < objects.shape[1] < 144
    assert _stage2_indices(batch, 50, cfg, 144, gen) is None  # every token once both phases are over


def test_tiny_training_run_writes_loadable_weights(tmp_path):
    from robustvtc.models import load_model

    cfg = TrainConfig(vision_steps=1, steps=3, batch_size=4, eval_every=3, eval_samples=5)
    report = train_builtin(tmp_path / "m", cfg, log=lambda _: None)
    saved = json.loads((tmp_path / "m" / "training_report.json").read_text())
    assert saved["config"]["steps"] == 3 and len(report["history"]) == 1
    adapter = load_model(str(tmp_path / "m"))
    assert adapter.num_visual_tokens == 144


def test_patch_cells_follow_the_3x3_grid():
    cells = _patch_cells().view(12, 12)
    assert cells[0, 0] == 0 and cells[0, 11] == 2 and cells[5, 5] == 4 and cells[11, 0] == 6 and cells[11, 11] == 8
    assert torch.bincount(cells.flatten()).tolist() == [16] * 9


def test_alignment_loss_rewards_tokens_that_read_as_their_words():
    batch = _batch(4)
    words = {w: i for i, w in enumerate(S.ANSWERS)}
    embeddings = torch.randn(len(S.ANSWERS), 16) * 3
    colours, shapes = list(S.COLOURS), list(S.SHAPES)
    matching = torch.zeros(4, 144, 16)
    on = batch["patch_shape"] > 0
    for b, p in on.nonzero().tolist():
        matching[b, p] = (embeddings[words[colours[batch["patch_colour"][b, p] - 1]]]
                          + embeddings[words[shapes[batch["patch_shape"][b, p] - 1]]])
    shuffled = matching[:, torch.randperm(144)]
    assert _alignment_loss(matching, batch, None, embeddings, words) < _alignment_loss(shuffled, batch, None, embeddings, words)
    background_only = matching.clone()
    background_only[~on] = torch.randn(int((~on).sum()), 16) * 100  # background tokens are not scored
    assert torch.isclose(_alignment_loss(background_only, batch, None, embeddings, words),
                         _alignment_loss(matching, batch, None, embeddings, words))
    idx = torch.arange(0, 144, 2).expand(4, -1)  # a kept subset scores the kept tokens' own labels
    assert torch.isclose(_alignment_loss(matching[:, ::2], batch, idx, embeddings, words),
                         _alignment_loss(matching[:, ::2], {k: v[:, ::2] for k, v in batch.items()
                                                            if k in ("patch_colour", "patch_shape")}, None,
                                         embeddings, words))


def test_stage2_workers_deliver_the_models_own_features_in_step_order():
    from robustvtc.training import _batches, new_builtin

    adapter = new_builtin(0)
    cfg = TrainConfig(batch_size=2)
    batches = list(_batches(cfg, 3, 7, frozen=adapter))  # two workers
    assert len(batches) == 4
    for step, batch in enumerate(batches, start=3):
        samples = [S.generate_sample(step * 2 + j, "train") for j in range(2)]
        assert batch["questions"] == [s.question for s in samples]
        assert torch.allclose(batch["features"], adapter.encode(S.to_pixels(samples)).features, atol=1e-5)
