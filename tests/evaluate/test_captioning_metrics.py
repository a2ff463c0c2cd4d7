"""mmjax.evaluate.captioning_metrics: the Python tokenizer against Stanford PTBTokenizer's output
(as the COCO toolkit runs it: `java ... PTBTokenizer -preserveLines -lowerCase`, then its
punctuation list removed), and BLEU/CIDEr against values the full COCO pipeline (pycocoevalcap 1.2
with its Java PTBTokenizer) computed for the same captions. The Java outputs are written here,
since the suite must not need Java."""

import pytest

from mmjax.evaluate import captioning_metrics

# caption -> what pycocoevalcap's PTBTokenizer made of it.
PTB_TOKENS = {
    "A man's dog isn't running.": "a man 's dog is n't running",
    "Two black-and-white cats, sitting on a mat!": "two black-and-white cats sitting on a mat",
    "A RED circle at the top-left; it's big...": "a red circle at the top-left it 's big",
    'She said "hello" -- then left?': "she said hello then left",
    "3.5 apples cost $2, don't they?": "3.5 apples cost $ 2 do n't they",
    "A man in a t-shirt  and jeans": "a man in a t-shirt and jeans",
    "the cat's toys: a ball & a mouse": "the cat 's toys a ball & a mouse",
    "People walk by o'clock's stores": "people walk by o'clock 's stores",
    "It's 10:30 a.m. now": "it 's 10:30 a.m. now",
    "can't won't I'm you're we'll they'd": "ca n't wo n't i 'm you 're we 'll they 'd",
    "tab\tsep": "tab sep",
    "café naïve": "café naïve",
    "It's a 'quoted' word": "it 's a quoted word",
    "e-mail @ home # 1 50% off": "e-mail @ home # 1 50 % off",
    "The cats' toys are here.": "the cats toys are here",
    "e.g., a red square": "e.g. a red square",
    "Is it 3.5.": "is it 3.5",
    "1,000 people at the U.S.A. game": "1,000 people at the u.s.a. game",
    'A sign reads: "STOP".': "a sign reads stop",
    "The 1990's style": "the 1990 's style",
    "A woman holding an umbrella/parasol.": "a woman holding an umbrella/parasol",
    "A 'red' and `blue' bus": "a red and blue bus",
    "Birds: flying -- high": "birds flying high",
}

REFERENCES = {
    "img1": ["A man is riding a horse on the beach.", "A person rides a brown horse along the shore.",
             "Man on a horse at the beach, near the water."],
    "img2": ["Two cats are sleeping on a red couch.", "A pair of cats sleep on the sofa.",
             "Two kittens napping on a couch!"],
    "img3": ["A large blue square in the upper left corner.", "A big blue square at the top left.",
             "There's a blue square in the top-left corner."],
    "img4": ["A plate of food with broccoli and rice.", "Broccoli, rice and chicken on a white plate.",
             "A dinner plate that has rice and broccoli on it."],
    "img5": ["A dog isn't allowed in the park.", "The dog's owner walks it in a park.",
             "A dog and its owner in the park."],
}
GOOD = {"img1": "A man riding a horse on the beach.", "img2": "Two cats sleeping on a couch.",
        "img3": "A blue square in the top left corner.", "img4": "A plate of rice and broccoli.",
        "img5": "A dog's owner in the park."}
POOR = {"img1": "a dog on a beach", "img2": "Two cats, sleeping!", "img3": "a red circle"}
# pycocoevalcap 1.2 with its Java PTBTokenizer on the captions above.
COCO_GOOD = {"bleu_1": 0.8920030614021228, "bleu_2": 0.846228406160106, "bleu_3": 0.726380647174033,
             "bleu_4": 0.5659070424112459, "cider": 3.1682476599595346}
COCO_POOR = {"bleu_1": 0.24429889540224578, "bleu_2": 0.1432329236353272, "bleu_3": 1.1128756418169404e-06,
             "bleu_4": 3.90061897450562e-09, "cider": 0.4612281549785271}


@pytest.mark.parametrize("caption", sorted(PTB_TOKENS))
def test_tokenizer_matches_ptb(caption):
    assert captioning_metrics.tokenize_caption(caption) == PTB_TOKENS[caption]


def test_documented_differences_from_ptb():
    assert captioning_metrics.tokenize_caption("A cat (on) a mat") == "a cat on a mat"   # PTB: -lrb- on -rrb-
    assert captioning_metrics.tokenize_caption("What's that?!") == "what 's that"       # PTB keeps "?!"


@pytest.mark.parametrize("predictions, want", [(GOOD, COCO_GOOD), (POOR, COCO_POOR)])
def test_scores_equal_the_coco_toolkit(predictions, want):
    references = {key: REFERENCES[key] for key in predictions}
    got = captioning_metrics.caption_metrics(predictions, references)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-15)
    assert all(type(v) is float for v in got.values())


def test_cider_depends_on_the_evaluated_set():
    """Document frequencies come from the set's references: img1 alone scores differently."""
    alone = captioning_metrics.caption_metrics({"img1": GOOD["img1"]}, {"img1": REFERENCES["img1"]})
    together = captioning_metrics.caption_metrics({"img1": GOOD["img1"], "img2": GOOD["img2"]},
                                                  {k: REFERENCES[k] for k in ("img1", "img2")})
    assert alone["cider"] != pytest.approx(together["cider"])


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="1 images without a prediction"):
        captioning_metrics.caption_metrics({"img1": "a man"}, {k: REFERENCES[k] for k in ("img1", "img2")})
    with pytest.raises(ValueError, match="non-empty list of captions"):
        captioning_metrics.caption_metrics({"img1": "a man"}, {"img1": "a man on a horse"})
    with pytest.raises(ValueError, match="one caption string"):
        captioning_metrics.caption_metrics({"img1": ["a man"]}, {"img1": ["a man"]})
    with pytest.raises(ValueError, match="no captions to score"):
        captioning_metrics.caption_metrics({}, {})
