"""Greedy decoding and sampling (temperature / top-k / top-p), one token per row per step, as
transformers' `_sample`: finished rows are fed and given the pad token until every row stops or
the length bound is reached."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mmjax.generate import logits as logits_lib
from mmjax.generate.loop import Run, by_rows, is_stop


class SampleState(NamedTuple):
    sequences: jax.Array     # (rows, buffer) prompt (left-aligned) then generated tokens, pad after
    length: jax.Array        # tokens written so far (prompt width included)
    finished: jax.Array      # (rows,) a stop token was generated
    lengths: jax.Array       # (rows,) generated tokens, the stop token included
    scores: jax.Array        # (rows,) sum of the model's log-probabilities of the generated tokens
    positions: jax.Array     # (rows,) the position of the next token fed to the model
    cache: Any
    key: jax.Array


def _choose(run: Run, state: SampleState, logits: jax.Array) -> SampleState:
    """Processes the scores, picks each row's next token and writes it at `length`."""
    static, length = run.static, state.length
    scores = logits_lib.process(logits, state.sequences, run.written(length), length, static, run.knobs)
    if static.do_sample:
        token = jax.random.categorical(jax.random.fold_in(state.key, length), scores, axis=-1)
    else:
        token = jnp.argmax(scores, axis=-1)
    token = jnp.where(state.finished, static.pad_token_id, token).astype(state.sequences.dtype)
    log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), token[:, None], axis=-1)[:, 0]
    sequences = jax.lax.dynamic_update_slice_in_dim(state.sequences, token[:, None], length, axis=1)
    return state._replace(
        sequences=by_rows(sequences), length=length + 1,
        finished=state.finished | is_stop(token, static.eos_token_id),
        lengths=jnp.where(state.finished, state.lengths, length + 1 - run.prompt_length),
        scores=state.scores + jnp.where(state.finished, 0.0, log_prob))


def sample(run: Run, sequences: jax.Array, logits: jax.Array, cache: Any, positions: jax.Array,
           key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Greedy / sampled continuation of prefilled rows: `logits` (rows, vocab) predict the first
    new token. Returns (sequences, generated lengths, log-probability sums)."""
    rows = sequences.shape[0]
    state = SampleState(sequences, jnp.int32(run.prompt_length), jnp.zeros(rows, bool),
                        jnp.zeros(rows, jnp.int32), jnp.zeros(rows, jnp.float32), positions, cache, key)
    state = _choose(run, state, logits)

    def unfinished(s: SampleState) -> jax.Array:
        return (s.length < run.knobs.max_length) & ~jnp.all(s.finished)

    def next_token(s: SampleState) -> SampleState:
        logits, cache = run.step(s.cache, s.sequences, s.length, s.positions)
        return _choose(run, s._replace(cache=cache, positions=s.positions + 1), logits)

    state = jax.lax.while_loop(unfinished, next_token, state)
    return state.sequences, state.lengths, state.scores
