"""mmjax.evaluate.vqa_score: VQA v2 accuracy and soft targets on hand-computed cases that follow
the official vqaEval.py (leave-one-out average of min(#matches / 3, 1); normalisation only when
the annotators disagree), and ViLT's score table for the BCE head."""

import numpy as np
import pytest

from mmjax.evaluate import vqa_score


@pytest.mark.parametrize("raw, normalized", [
    ("Two dogs.", "2 dogs"),              # period dropped, number word to digit, lower case
    ("the cat's", "cat's"),               # article dropped
    ("An apple", "apple"),
    ("1,000", "1000"),                    # a digit,digit comma: every mark is deleted, not spaced
    ("3.5", "3.5"),                       # a period before a digit stays
    ("black/white", "black white"),       # a mark touching no space becomes a space
    ("red ; blue", "red blue"),           # ... and one touching a space is deleted
    ("(left)", "left"),
    ("Yes!", "yes"),
    ("dont", "don't"),                    # contractions get their apostrophe
    ("whats up", "what's up"),
    ("none", "0"),
    ("  ten\t", "10"),
    ("well...", "well"),
])
def test_normalize_answer(raw, normalized):
    assert vqa_score.normalize_answer(raw) == normalized


def test_scores_by_number_of_matching_annotators():
    """Leave-one-out: c matching of 10 -> (c·min(1, (c-1)/3) + (10-c)·min(1, c/3)) / 10."""
    for matches, want in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        answers = ["yes"] * matches + ["no"] * (10 - matches)
        assert vqa_score.vqa_accuracy("yes", answers) == pytest.approx(want)
        assert vqa_score.leave_one_out_score(matches) == pytest.approx(want)
    # 3 annotators, 2 agree: leaving out one of the two -> 1/3, leaving out the other -> 2/3.
    assert vqa_score.leave_one_out_score(2, 3) == pytest.approx((1 / 3 + 1 / 3 + 2 / 3) / 3)


def test_normalisation_applies_only_when_annotators_disagree():
    # Disagreement: "Two" and "two." both normalise to "2", so 3 annotators match -> 0.9.
    answers = ["2", "two.", "Two"] + ["3"] * 7
    assert vqa_score.vqa_accuracy("TWO!", answers) == pytest.approx(0.9)
    # All ten identical: vqaEval.py compares the stripped strings as they are.
    assert vqa_score.vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa_score.vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0
    assert vqa_score.vqa_accuracy("Yes", ["yes"] * 10) == 0.0


def test_mean_accuracy():
    answers = [["yes"] * 3 + ["no"] * 7, ["red"] * 10, ["2"] * 1 + ["3"] * 9]
    assert vqa_score.mean_vqa_accuracy(["yes", "red", "two"], answers) == pytest.approx((0.9 + 1.0 + 0.3) / 3)


def test_soft_score_targets_follow_vilt_scores():
    """ViLT's get_score: 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, >= 4 -> 1.0, from normalised answer counts."""
    vocab = {"yes": 0, "no": 1, "2": 2, "red": 3}
    answers = [["yes"] * 3 + ["no"] * 7,
               ["two", "2", "Two.", "2", "3", "3", "3", "3", "3", "3"],   # "3" is not in the vocabulary
               ["red", "blue", "green", "blue", "blue", "blue", "blue", "blue", "blue", "blue"]]
    want = np.array([[0.9, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.3]], np.float32)
    got = vqa_score.soft_score_targets(answers, vocab)
    assert got.dtype == np.float32 and got.shape == (3, 4)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert vqa_score.soft_score_targets(answers, vocab, num_answers=6).shape == (3, 6)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="non-empty list of strings"):
        vqa_score.vqa_accuracy("yes", "yes")
    with pytest.raises(ValueError, match="one list of human answers per prediction"):
        vqa_score.mean_vqa_accuracy(["yes", "no"], [["yes"]])
    with pytest.raises(ValueError, match="outside 2 answers"):
        vqa_score.soft_score_targets([["yes"]], {"yes": 0, "no": 5}, num_answers=2)
    with pytest.raises(ValueError, match="expected a list of human answers"):
        vqa_score.soft_score_targets(["yes"], {"yes": 0})
    with pytest.raises(ValueError, match="matches <= annotators"):
        vqa_score.leave_one_out_score(11)
