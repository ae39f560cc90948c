"""The built-in model's training recipe: the visibility curriculum shows what it claims, and a tiny run
writes weights that load through the public loader."""
import collections
import json
import math
from functools import partial

import pytest
import torch

from robustvtc.data import synthetic as S
from tools.builtin_recipe import (COLUMN_WORDS, READOUT_SIZES, ROW_WORDS, TrainConfig, _alignment_loss, _collate,
                                _collate_scenes, _packed_answer_loss, _patch_cells, _phase, _readout_loss,
                                _scene_indices, new_builtin, train_builtin)


def _batch(n=12):
    return _collate([S.generate_sample(i, "train") for i in range(n)])


def _scenes(n=6, visible=None):
    return _collate_scenes([S.generate_scene(i, "train", visible=visible) for i in range(n)])


def test_scene_questions_cover_every_type_and_match_the_scene():
    objects, questions = S.generate_scene(3, per_type=2)
    assert {q.qtype for q in questions} == set(S.QUESTION_TYPES)
    assert len({q.question for q in questions}) == len(questions)  # no question twice
    for q in questions:  # each answer is the one the scene's own question generator gives
        assert (q.question, q.answer, q.referents) in S._candidate_questions(objects, q.qtype)
    counts = collections.Counter(q.answer for i in range(200) for q in S.generate_scene(i)[1] if q.qtype == "count")
    assert min(counts[n] for n in S.NUMBERS) > 0.1 * sum(counts.values())  # large counts are not rare


def test_pair_scenes_ask_only_about_the_two_shown_objects():
    objects, questions = S.generate_scene(5, visible=2)
    shown = questions[0].objects
    assert len(shown) == 2 and all(o in objects for o in shown)
    for q in questions:
        assert (q.question, q.answer, q.referents) in S._candidate_questions(shown, q.qtype)


def test_curriculum_phases_show_what_they_claim():
    cfg = TrainConfig(steps=100, pair_fraction=0.3, objects_fraction=0.2, drop_prob=0.0)
    assert [_phase(cfg, s) for s in (29, 30, 49, 50)] == ["pair", "objects", "objects", "full"]
    gen = torch.Generator().manual_seed(0)
    pair = _scenes(visible=2)
    idx = _scene_indices(pair, "pair", cfg, 144, gen)
    for b in range(idx.shape[0]):
        kept = set(idx[b].tolist())
        assert idx[b].tolist() == sorted(kept)  # raster order, no repeats
        assert set(pair["shown_mask"][b].nonzero().flatten().tolist()) <= kept  # the questions' objects ...
        assert not kept & set(pair["hidden_mask"][b].nonzero().flatten().tolist())  # ... and never a hidden one
    everything = _scenes()
    idx = _scene_indices(everything, "objects", cfg, 144, gen)
    for b in range(idx.shape[0]):
        assert set(everything["object_mask"][b].nonzero().flatten().tolist()) <= set(idx[b].tolist())
    assert _scene_indices(everything, "full", cfg, 144, gen) is None  # every token once both phases are over


def test_packed_questions_score_exactly_as_one_question_forwards():
    """Packing several questions after one image must not let them see each other."""
    adapter = new_builtin(0)
    answer_id = {a: adapter.continuation_ids("what color is the circle ?", a)[0] for a in S.ANSWERS}
    scenes = [S.generate_scene(i)[1] for i in range(3)]
    visual = torch.randn(3, 20, 128)
    questions = [[q.question for q in qs[:7 - i]] for i, qs in enumerate(scenes)]  # ragged: 7, 6, 5 questions
    answers = [[q.answer for q in qs[:7 - i]] for i, qs in enumerate(scenes)]
    packed, _, _ = _packed_answer_loss(adapter, visual, questions, answers, answer_id)
    one_by_one = torch.cat([visual[i].expand(len(q), -1, -1) for i, q in enumerate(questions)])
    with_eos = [f"{a} {adapter.tokenizer.eos_token}" for a in sum(answers, [])]  # the loss covers the answer and EOS
    single = -adapter.sequence_logprob(one_by_one, sum(questions, []), with_eos).mean() / 2
    assert torch.isclose(packed, single, atol=1e-5)


def test_attention_supervision_scores_the_mass_on_each_questions_referents():
    """With all keys zero, attention is uniform over the tokens a question may see, so the loss is known exactly:
    -log(referent tokens / visible tokens), and -log(1 / visible tokens) (the first token) without a referent;
    head 1 of a count spreads its target evenly over the sink and the centres, so its cross-entropy with the
    uniform attention is -log(1 / visible tokens) whatever the count."""
    adapter = new_builtin(0)
    answer_id = {a: adapter.continuation_ids("what color is the circle ?", a)[0] for a in S.ANSWERS}
    batch = _scenes(2)
    referents = batch["referents"]
    assert referents.any(-1).any() and not referents.any(-1).all()  # "no" existence, "zero" count: no referent
    with torch.no_grad():
        adapter.model.model.language_model.layers[2].self_attn.k_proj.weight.zero_()
    _, attend, _ = _packed_answer_loss(adapter, adapter.project(torch.randn(2, 144, 128)), batch["questions"],
                                    batch["answers"], answer_id, referents, 2, batch["count_centres"])
    expected = []
    for b, questions in enumerate(batch["questions"]):
        prefix, _ = adapter._prompt_ids(questions[0])
        for j, q in enumerate(questions):
            seen = len(prefix) + 144 + len(adapter._prompt_ids(q)[1])
            for head in range(2):
                n = 1 if head == 1 and q.startswith("how many") else int(referents[b, j, head].sum())
                expected.append(-math.log(max(n, 1) / seen))
    assert math.isclose(attend.item(), sum(expected) / len(expected), rel_tol=1e-4)


def test_readout_labels_name_each_questions_referents():
    scenes = [S.generate_scene(i, "train") for i in range(4)]
    batch = _collate_scenes(scenes)
    places, kinds = batch["referent_places"], batch["referent_kinds"]
    seen = set()
    for b, (_, questions) in enumerate(scenes):
        for j, q in enumerate(questions):
            if q.qtype == "count":  # a set: no place, only the count
                assert places[b, j].isnan().all() and (kinds[b, j, :5] == -100).all()
                assert S.NUMBERS[kinds[b, j, 5]] == q.answer
                continue
            if not q.referents:  # nothing
                assert places[b, j].isnan().all() and (kinds[b, j] == -100).all()
                continue
            first, last = q.objects[q.referents[0]], q.objects[q.referents[-1]]
            assert places[b, j, :4].tolist() == [first.cell // 3, first.cell % 3, last.cell // 3, last.cell % 3]
            assert kinds[b, j, :4].tolist() == [list(S.COLOURS).index(first.colour),
                                                list(S.COLOURS).index(last.colour), list(S.SHAPES).index(first.shape),
                                                list(S.SHAPES).index(last.shape)]
            if q.qtype == "relation":  # the margin's sign is the answer; the relation word is the question's
                assert (places[b, j, 4] > 0) == (q.answer == "yes") and places[b, j, 4] != 0
                assert S.RELATIONS[kinds[b, j, 4]] in q.question
            else:
                assert places[b, j, 4].isnan() and kinds[b, j, 4] == -100
            assert kinds[b, j, 5] == -100
            seen.add(q.qtype)
    assert seen == {"color", "shape", "exist", "relation"}
    assert places[:, len(scenes[0][1]):].isnan().all()  # rows past a scene's questions are padding


def test_readout_loss_is_squared_place_error_plus_attribute_cross_entropy():
    """Zero outputs predict place 0 and uniform attributes, so the loss is known exactly."""
    batch = _scenes(3)
    n = sum(len(q) for q in batch["questions"])
    places = torch.cat([batch["referent_places"][b, :len(q)] for b, q in enumerate(batch["questions"])])
    loss = _readout_loss(torch.zeros(n, sum(READOUT_SIZES)), batch)
    expected = (places[~places.isnan()].pow(2).mean() + 2 * math.log(len(S.COLOURS)) + 2 * math.log(len(S.SHAPES))
                + math.log(len(S.RELATIONS)) + math.log(len(S.NUMBERS)))
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-5)


def test_centre_labels_mark_one_patch_per_object_and_the_counted_objects():
    scenes = [S.generate_scene(i, "train") for i in range(4)]
    batch = _collate_scenes(scenes)
    for b, (objects, questions) in enumerate(scenes):
        centres = batch["centre_mask"][b].nonzero().flatten().tolist()
        assert len(centres) == len(objects)  # objects never share a cell, so no two share a centre patch
        for o in objects:  # exactly one of them holds the object's centre pixel
            assert sum(_covers(p, o) for p in centres) == 1
        for j, q in enumerate(questions):
            counted = batch["count_centres"][b, j]
            if q.qtype == "count":
                assert int(counted.sum()) == S.NUMBERS.index(q.answer)
                assert set(counted.nonzero().flatten().tolist()) <= set(centres)
            else:
                assert not counted.any()


def _covers(patch: int, obj: S.SceneObject) -> bool:
    row, col = divmod(patch, 12)
    return row * 8 <= obj.cy < row * 8 + 8 and col * 8 <= obj.cx < col * 8 + 8


def test_tiny_training_run_writes_loadable_weights(tmp_path):
    from robustvtc.models import load_model

    cfg = TrainConfig(vision_steps=1, steps=3, batch_size=4, scenes=2, eval_every=3, eval_samples=5)
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
    vocabulary = list(dict.fromkeys([*S.ANSWERS, *ROW_WORDS, *COLUMN_WORDS]))
    words = {w: i for i, w in enumerate(vocabulary)}
    embeddings = torch.eye(len(vocabulary), 32) * 3  # orthogonal words: a token scores exactly the words it holds
    colours, shapes = list(S.COLOURS), list(S.SHAPES)
    on = batch["patch_shape"] > 0

    def tokens(cell_shift: int) -> torch.Tensor:
        """Each object patch as the sum of its colour, shape, row and column words (of the cell shifted by
        ``cell_shift``)."""
        out = torch.zeros(4, 144, 32)
        for b, p in on.nonzero().tolist():
            cell = (int(batch["patch_cell"][b, p]) + cell_shift) % (S.GRID * S.GRID)
            out[b, p] = (embeddings[words[colours[batch["patch_colour"][b, p] - 1]]]
                         + embeddings[words[shapes[batch["patch_shape"][b, p] - 1]]]
                         + embeddings[words[ROW_WORDS[cell // S.GRID]]]
                         + embeddings[words[COLUMN_WORDS[cell % S.GRID]]])
        return out

    matching, misplaced = tokens(0), tokens(4)
    loss = partial(_alignment_loss, word_embeddings=embeddings, word_id=words, place_weight=1.0)
    assert loss(matching, batch, None) < loss(matching[:, torch.randperm(144)], batch, None)
    assert loss(matching, batch, None) < loss(misplaced, batch, None)
    assert torch.isclose(loss(misplaced, batch, None, place_weight=0.0), loss(matching, batch, None, place_weight=0.0))
    background_only = matching.clone()
    background_only[~on] = torch.randn(int((~on).sum()), 32) * 100  # background tokens are not scored
    assert torch.isclose(loss(background_only, batch, None), loss(matching, batch, None))
    idx = torch.arange(0, 144, 2).expand(4, -1)  # a kept subset scores the kept tokens' own labels
    kept = {k: v[:, ::2] for k, v in batch.items() if k in ("patch_colour", "patch_shape", "patch_cell")}
    assert torch.isclose(loss(matching[:, ::2], batch, idx), loss(matching[:, ::2], kept, None))


def test_stage2_workers_deliver_the_models_own_features_in_step_order():
    from functools import partial

    from tools.builtin_recipe import _loader, _scene_batch

    adapter = new_builtin(0)
    cfg = TrainConfig(scenes=2, steps=100, pair_fraction=0.0, objects_fraction=0.0, drop_prob=0.0)
    batches = list(_loader(partial(_scene_batch, cfg, adapter), 3, 7, workers=2))
    assert len(batches) == 4
    for step, batch in enumerate(batches, start=3):
        scenes = [S.generate_scene(step * 2 + j, "train") for j in range(2)]
        assert batch["questions"] == [[q.question for q in qs] for _, qs in scenes]
        pixels = S.to_pixels([qs[0] for _, qs in scenes])
        assert torch.allclose(batch["features"], adapter.encode(pixels).features, atol=1e-5)


def test_retraining_writes_a_new_folder_unless_told_otherwise(tmp_path, capsys):
    from robustvtc.models.builtin import BUILTIN_DIR
    from tools.train_builtin import main

    (tmp_path / "mine.txt").write_text("a user's file")
    for out in (BUILTIN_DIR, tmp_path):
        with pytest.raises(SystemExit) as exit_info:
            main(["--out", str(out), "--steps", "1"])
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "add --replace-shipped" in err and "already holds files" in err
    assert (tmp_path / "mine.txt").read_text() == "a user's file"
