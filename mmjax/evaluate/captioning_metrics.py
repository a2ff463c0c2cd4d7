"""Captioning metrics: BLEU-1..4 and CIDEr(-D) with the COCO caption scorers of `pycocoevalcap`.

The scorers are pure Python; the COCO pipeline's PTBTokenizer is not (it runs Stanford CoreNLP
under Java), so `tokenize_caption` stands in for it: lower case, clitics split off ("dog's" ->
"dog 's", "isn't" -> "is n't"), the symbols $ % & @ # as their own tokens, and the punctuation
that the COCO pipeline removes after PTB tokenisation dropped. On ordinary captions it gives the
same tokens as PTBTokenizer (tests/evaluate/test_captioning_metrics.py compares them), so scores
equal the COCO toolkit's. Where it differs: brackets are dropped (PTB writes -lrb- etc., which the
COCO punctuation list, being upper case, fails to remove), single-word abbreviations lose their
period ("mr." -> "mr"), and runs of marks such as "?!" are dropped (PTB keeps them as a token).

CIDEr's document frequencies come from the references of the evaluated set, as in the COCO
toolkit: the score of a caption depends on the whole set it is scored with.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping, Sequence

_CLITIC = re.compile(r"(\w)(n't|'s|'re|'ll|'d|'m|'ve)\b")
_SYMBOL = re.compile(r"([$%&@#])")
_EDGE_PUNCTUATION = "\"'`.,!?;:()[]{}-"   # stripped from both ends of a word
_ABBREVIATION = re.compile(r"([a-z]\.){2,}")  # "a.m.", "u.s." keep their final period
_CLITICS = frozenset({"n't", "'s", "'re", "'ll", "'d", "'m", "'ve"})


def tokenize_caption(text: str) -> str:
    """PTB-style tokens of a caption, lower case, punctuation removed, joined by single spaces."""
    text = _SYMBOL.sub(r" \1 ", _CLITIC.sub(r"\1 \2", text.lower()))
    words = []
    for word in text.split():
        if word not in _CLITICS:
            stripped = word.strip(_EDGE_PUNCTUATION)
            abbreviation = stripped + "."
            word = abbreviation if _ABBREVIATION.fullmatch(abbreviation) and abbreviation in word else stripped
        if word:
            words.append(word)
    return " ".join(words)


def caption_metrics(predictions: Mapping[Hashable, str],
                    references: Mapping[Hashable, Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-1..4 (COCO's "closest" reference length) and CIDEr-D of one predicted caption
    per image against its reference captions; keys are image ids. Returns plain floats."""
    if set(predictions) != set(references):
        missing, extra = set(references) - set(predictions), set(predictions) - set(references)
        raise ValueError(f"predictions and references must cover the same images: {len(missing)} images "
                         f"without a prediction (e.g. {sorted(map(str, missing))[:3]}), {len(extra)} "
                         f"predictions without references (e.g. {sorted(map(str, extra))[:3]})")
    if not predictions:
        raise ValueError("no captions to score")
    res, gts = {}, {}
    for key, caption in predictions.items():
        refs = references[key]
        if not isinstance(caption, str):
            raise ValueError(f"image {key!r}: the prediction must be one caption string, got {type(caption).__name__}")
        if isinstance(refs, str) or not refs:
            raise ValueError(f"image {key!r}: references must be a non-empty list of captions, got {refs!r}")
        res[key] = [tokenize_caption(caption)]
        gts[key] = [tokenize_caption(r) for r in refs]
    try:  # an optional extra (a 100 MB wheel): the main job does not need it
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError as e:
        raise ImportError("Captioning metrics need pycocoevalcap: pip install 'mmjax[captioning]'") from e
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {**{f"bleu_{n}": float(b) for n, b in enumerate(bleu, 1)}, "cider": float(cider)}
