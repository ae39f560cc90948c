"""The synthetic task: deterministic, balanced, answerable from specific regions."""
from collections import Counter

import numpy as np
import pytest

from robustvtc.data import synthetic as S
from robustvtc.errors import UserInputError


def test_same_index_same_sample_and_splits_differ():
    a, b = S.generate_sample(7, "test"), S.generate_sample(7, "test")
    assert np.array_equal(a.image, b.image) and a.question == b.question and a.answer == b.answer
    c = S.generate_sample(7, "train")
    assert not np.array_equal(a.image, c.image)


def test_question_types_cycle_and_answers_in_candidate_set():
    data = S.generate_dataset(50, "val")
    assert Counter(s.qtype for s in data) == {t: 10 for t in S.QUESTION_TYPES}
    for s in data:
        assert s.answer in S.ANSWERS
        assert s.image.shape == (96, 96, 3) and s.image.dtype == np.uint8
        assert 3 <= len(s.objects) <= 6


def test_answers_are_consistent_with_the_scene():
    for s in S.generate_dataset(100, "val"):
        if s.qtype == "color":
            shape = s.question.split()[-2]
            assert [o.colour for o in s.objects if o.shape == shape] == [s.answer]
        elif s.qtype == "count":
            colour = s.question.split()[2]
            assert S.NUMBERS[sum(o.colour == colour for o in s.objects)] == s.answer
        elif s.qtype == "exist":
            colour, shape = s.question.split()[3:5]
            assert (s.answer == "yes") == any(o.colour == colour and o.shape == shape for o in s.objects)
        elif s.qtype == "shape":
            pos = s.question[len("what shape is at the "):-2]
            assert [o.shape for o in s.objects if S.POSITIONS[o.cell] == pos] == [s.answer]


def test_objects_are_small_so_most_tokens_are_background():
    covered = [s.object_patch_mask().mean() for s in S.generate_dataset(50, "val")]
    assert 0.05 < float(np.mean(covered)) < 0.45  # the answer lives in a minority of the 144 patches


def test_yes_no_balanced():
    data = [s for s in S.generate_dataset(400, "val") if s.qtype in ("exist", "relation")]
    share = np.mean([s.answer == "yes" for s in data])
    assert 0.35 < share < 0.65


def test_bad_split_and_type():
    with pytest.raises(UserInputError, match="accepted: train, val, test"):
        S.generate_sample(0, "dev")
    with pytest.raises(UserInputError, match="question type"):
        S.generate_sample(0, "test", qtype="ocr")
