"""VQA v2 accuracy (Antol et al. 2015; Goyal et al. 2017) and the soft targets of BCE VQA heads.

An answer is right in full when at least 3 of the 10 annotators gave it: acc = min(#matches / 3, 1).
The official evaluation (GT-Vision-Lab/VQA, vqaEval.py) averages that over the 10 subsets of 9
annotators (leave one out), so one matching annotator scores 0.3, two 0.6, three 0.9, four or
more 1.0. Answers are compared after its normalisation: punctuation dropped or turned into
spaces, periods not followed by a digit removed, lower case, number words to digits, articles
dropped, contractions given their apostrophe. As in vqaEval.py, the normalisation is applied only
when the annotators disagree (with 10 identical answers the prediction is compared after
stripping whitespace alone), so the numbers equal the official ones.

ViLT (and the bottom-up-attention preprocessing BLIP's classifier baselines use) trains a sigmoid
head on each answer's score from its count, which is the same leave-one-out average:
`soft_score_targets`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

# vqaEval.py's `contractions`, less the entries that change nothing (capitalised keys never match
# after lower-casing; "let's" and "she's" map to themselves). "somebody'd=somebodyd" is as it has it.
_CONTRACTION_PAIRS = """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
howd=how'd howll=how'll hows=how's isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll
maam=ma'am mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've
mustnt=mustn't mustve=must've neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't
ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've
shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've
somebody'd=somebodyd somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll
somebodys=somebody's someoned=someone'd someoned've=someone'd've someone'dve=someone'd've
someonell=someone'll someones=someone's somethingd=something'd somethingd've=something'd've
something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd
theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas
wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're
whats=what's whatve=what've whens=when's whered=where'd wheres=where's whereve=where've whod=who'd
whod've=who'd've who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll whyre=why're
whys=why's wont=won't wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've
wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've
y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've youll=you'll
youre=you're youve=you've
"""
_CONTRACTIONS = dict(pair.split("=") for pair in _CONTRACTION_PAIRS.split())
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
MATCHES_FOR_FULL_CREDIT = 3


def _punctuation(text: str) -> str:
    """Each mark is deleted when it touches a space in the original text (or the text has a
    digit,digit comma anywhere), else replaced by a space; then periods not before a digit go."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if touches_space or delete_all else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _digits_articles_contractions(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def _strip(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(answer: str) -> str:
    """The official answer normalisation: whitespace, punctuation, case, number words, articles,
    contractions. "Two dogs." -> "2 dogs"; "the cat's" -> "cat's"; "1,000" -> "1000"."""
    return _digits_articles_contractions(_punctuation(_strip(answer)))


def leave_one_out_score(matches: int, annotators: int = 10) -> float:
    """Mean over the `annotators` leave-one-out subsets of min(matches in the subset / 3, 1), for
    an answer that `matches` of them gave."""
    if not 0 <= matches <= annotators or annotators < 1:
        raise ValueError(f"need 0 <= matches <= annotators and annotators >= 1; got {matches} of {annotators}")
    dropped_match = min(1.0, (matches - 1) / MATCHES_FOR_FULL_CREDIT) if matches else 0.0
    dropped_other = min(1.0, matches / MATCHES_FOR_FULL_CREDIT)
    return (matches * dropped_match + (annotators - matches) * dropped_other) / annotators


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """One question's official VQA accuracy in [0, 1] (module docstring)."""
    if isinstance(human_answers, str) or not human_answers:
        raise ValueError(f"human_answers must be a non-empty list of strings, got {human_answers!r}")
    humans = [_strip(a) for a in human_answers]
    prediction = _strip(prediction)
    if len(set(humans)) > 1:   # vqaEval.py normalises only when the annotators disagree
        humans = [normalize_answer(a) for a in humans]
        prediction = normalize_answer(prediction)
    return leave_one_out_score(humans.count(prediction), len(humans))


def mean_vqa_accuracy(predictions: Sequence[str], human_answers: Sequence[Sequence[str]]) -> float:
    """Official overall accuracy as a fraction (vqaEval.py reports it ×100, rounded)."""
    if len(predictions) != len(human_answers) or not predictions:
        raise ValueError(f"need one list of human answers per prediction and at least one question; got "
                         f"{len(predictions)} predictions and {len(human_answers)} answer lists")
    return float(np.mean([vqa_accuracy(p, a) for p, a in zip(predictions, human_answers)]))


def soft_score_targets(human_answers: Sequence[Sequence[str]], answer_index: Mapping[str, int],
                       num_answers: int | None = None) -> np.ndarray:
    """(B, num_answers) float32 targets for a BCE VQA head: each answer of the vocabulary scores
    `leave_one_out_score(count)` from how many annotators gave it (after `normalize_answer`, always
    applied here); answers outside `answer_index` are dropped, as ViLT's preprocessing does."""
    size = num_answers if num_answers is not None else len(answer_index)
    if answer_index and max(answer_index.values()) >= size:
        raise ValueError(f"answer_index holds index {max(answer_index.values())}, outside {size} answers")
    targets = np.zeros((len(human_answers), size), np.float32)
    for row, answers in enumerate(human_answers):
        if isinstance(answers, str):
            raise ValueError(f"row {row}: expected a list of human answers, got the string {answers!r}")
        counts = Counter(normalize_answer(a) for a in answers)
        for answer, count in counts.items():
            if answer in answer_index:
                targets[row, answer_index[answer]] = leave_one_out_score(count, len(answers))
    return targets
