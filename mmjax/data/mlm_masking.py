"""Token masking for masked language modeling (BERT; ViLT's whole-word variant), pure numpy.

Every draw comes from the numpy Generator passed in, so masks are reproducible per seed. The
draws are made in the order of transformers' numpy ``DataCollatorForLanguageModeling``: a
Bernoulli(prob) per maskable token (per word, at its first piece, with ``whole_word``), then a
Bernoulli(mask_replace_prob) choosing [MASK], then a Bernoulli(random_replace_prob / rest)
choosing a random token among the rest; the others keep their token (BERT's 80/10/10).

Two deliberate differences from transformers (5.x):
- random replacements are drawn from the non-special ids only: transformers and BERT draw from
  the whole vocabulary, so a random [PAD] or [CLS] could appear inside a text, where a padding
  mask built from the ids would then hide it.
- words for ``whole_word`` are WordPiece's: a "##" piece joins the token before it (as BERT's
  and ViLT's whole-word masking, and transformers 4's ``DataCollatorForWholeWordMask``), and the
  80/10/10 split still applies per token as in ViLT. transformers 5 groups characters with no
  gap between them (so "circle," is one word) and forces every masked token to [MASK].
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

IGNORE_ID = -100   # label of unmasked positions; losses skip it (transformers' convention)


def maskable(ids: np.ndarray, special_token_ids: Iterable[int]) -> np.ndarray:
    """True where a token may be masked: not [PAD], [CLS], [SEP], [MASK], [UNK] (any listed id)."""
    return ~np.isin(ids, np.asarray(list(special_token_ids), dtype=np.int64))


def word_ids(ids: np.ndarray, can_mask: np.ndarray, is_continuation: np.ndarray) -> np.ndarray:
    """Per token, the index of its word within the row (0, 1, ...), -1 for unmaskable tokens.

    A maskable token starts a new word unless it is a "##" continuation piece following
    another maskable token. `is_continuation` is a (vocab_size,) bool lookup by id.
    """
    previous = np.zeros_like(can_mask)
    previous[..., 1:] = can_mask[..., :-1]
    starts = can_mask & ~(is_continuation[ids] & previous)
    words = np.cumsum(starts, axis=-1) - 1
    return np.where(can_mask, words, -1)


def _check(ids: np.ndarray, vocab_size: int, mask_token_id: int, prob: float, mask_replace_prob: float,
           random_replace_prob: float) -> None:
    if not np.issubdtype(ids.dtype, np.integer) or ids.ndim < 1:
        raise ValueError(f"mlm masking needs integer token ids of shape (..., L), got {ids.dtype} {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got range [{ids.min()}, {ids.max()}]")
    if not 0 <= mask_token_id < vocab_size:
        raise ValueError(f"mask_token_id {mask_token_id} outside the vocabulary of {vocab_size}")
    for name, p in [("prob", prob), ("mask_replace_prob", mask_replace_prob),
                    ("random_replace_prob", random_replace_prob)]:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {p}")
    if mask_replace_prob + random_replace_prob > 1.0:
        raise ValueError(f"mask_replace_prob + random_replace_prob must be <= 1, got "
                         f"{mask_replace_prob} + {random_replace_prob}")


def select_positions(ids: np.ndarray, rng: np.random.Generator, can_mask: np.ndarray, prob: float,
                     words: np.ndarray | None = None) -> np.ndarray:
    """Bool mask of the positions to predict: each maskable token (or each word) with `prob`.

    With `words` (from :func:`word_ids`) a word is drawn once, at its first piece, and all its
    pieces follow; without, every maskable token is drawn on its own.
    """
    rows = ids.reshape(-1, ids.shape[-1])
    if words is None:
        chances = np.where(can_mask.reshape(rows.shape), prob, 0.0)
        return rng.binomial(1, chances, size=chances.shape).astype(bool).reshape(ids.shape)
    words = words.reshape(rows.shape)
    first = np.zeros(words.shape, dtype=bool)
    first[:, 0] = words[:, 0] >= 0
    first[:, 1:] = (words[:, 1:] >= 0) & (words[:, 1:] != words[:, :-1])
    drawn = rng.binomial(1, np.where(first, prob, 0.0), size=words.shape).astype(bool)
    # Word ids made unique across rows, then every piece of a drawn word is selected.
    unique = words + np.arange(words.shape[0])[:, None] * (words.shape[1] + 1)
    chosen = np.isin(unique, unique[drawn]) & (words >= 0)
    return chosen.reshape(ids.shape)


def mask_tokens(ids: np.ndarray, rng: np.random.Generator, *, mask_token_id: int, vocab_size: int,
                special_token_ids: Iterable[int], prob: float = 0.15, mask_replace_prob: float = 0.8,
                random_replace_prob: float = 0.1, whole_word: bool = False,
                is_continuation: np.ndarray | None = None,
                ignore_id: int = IGNORE_ID) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking of token ids (..., L): returns (inputs, labels), both int32.

    Selected positions get label = the original id (others `ignore_id`); of them a share
    `mask_replace_prob` becomes [MASK], `random_replace_prob` a random non-special id, the rest
    stays. Special tokens and padding are never selected. `whole_word` selects whole WordPiece
    words and needs `is_continuation`, the (vocab_size,) bool table of "##" pieces.
    """
    ids = np.asarray(ids)
    _check(ids, vocab_size, mask_token_id, prob, mask_replace_prob, random_replace_prob)
    specials = sorted({int(i) for i in special_token_ids})
    can_mask = maskable(ids, specials)
    words = None
    if whole_word:
        if is_continuation is None or np.shape(is_continuation) != (vocab_size,):
            raise ValueError(f"whole_word masking needs is_continuation, a ({vocab_size},) bool array of the "
                             f"'##' pieces, got {None if is_continuation is None else np.shape(is_continuation)}")
        words = word_ids(ids, can_mask, np.asarray(is_continuation, dtype=bool))
    selected = select_positions(ids, rng, can_mask, prob, words)

    labels = np.where(selected, ids, ignore_id).astype(np.int32)
    inputs = ids.astype(np.int32, copy=True)
    to_mask = rng.binomial(1, mask_replace_prob, size=ids.shape).astype(bool) & selected
    inputs[to_mask] = mask_token_id
    if random_replace_prob == 0.0 or mask_replace_prob == 1.0:
        return inputs, labels
    share_of_rest = random_replace_prob / (1.0 - mask_replace_prob)
    to_random = rng.binomial(1, share_of_rest, size=ids.shape).astype(bool) & selected & ~to_mask
    ordinary = np.setdiff1d(np.arange(vocab_size), specials)
    if ordinary.size == 0:
        raise ValueError("random replacement needs at least one non-special token in the vocabulary")
    inputs[to_random] = ordinary[rng.integers(0, ordinary.size, size=int(to_random.sum()))]
    return inputs, labels
