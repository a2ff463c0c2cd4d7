"""Beam search (and beam sampling) with transformers' `generate` scoring and finishing rules.

Per step and example: every running beam's log-probabilities (processed) plus its score give
beams * vocab candidates; the best (or, sampling, a draw without replacement of) 2 * beams — at
least (stop tokens + 1) * beams — are kept so that `beams` of them can continue without a stop.
Candidates that end (a stop token, or the length bound) among the best `beams` compete with the
finished hypotheses on score / generated_length ** length_penalty; the best `beams` not ending
run on. A row stops as `early_stopping` says (see `GenerationConfig`); the loop stops when no row
can improve. Static shapes throughout; the cache is reordered inside each example.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mmjax.generate import cache_layout
from mmjax.generate import logits as logits_lib
from mmjax.generate.loop import Run, by_rows, is_stop

_NEG = -1.0e9          # transformers' "impossible" score: keeps the arithmetic finite


class BeamState(NamedTuple):
    running: jax.Array           # (batch, beams, buffer) running sequences
    running_scores: jax.Array    # (batch, beams) summed log-probabilities
    done: jax.Array              # (batch, beams, buffer) finished hypotheses, best first
    done_scores: jax.Array       # (batch, beams) their length-penalised scores (_NEG: empty slot)
    done_lengths: jax.Array      # (batch, beams) their generated lengths
    is_done: jax.Array           # (batch, beams) the slot holds a finished hypothesis
    improvable: jax.Array        # (batch,) a running beam may still beat the finished ones
    all_ended: jax.Array         # () every kept candidate of the last step ended
    length: jax.Array            # tokens written so far (prompt width included)
    positions: jax.Array         # (batch * beams,) the position of the next token fed
    cache: Any
    key: jax.Array


def _gather(x: jax.Array, index: jax.Array) -> jax.Array:
    """x (batch, n, ...) rows picked by index (batch, m)."""
    return jax.vmap(lambda rows, i: rows[i])(x, index)


def _top_candidates(run: Run, scores: jax.Array, keep: int, key: jax.Array, length: jax.Array):
    """scores (batch, beams * vocab) → (values, flat indices) of `keep` candidates, best first."""
    if not run.static.do_sample:
        return jax.lax.top_k(scores, keep)
    # a draw of `keep` candidates without replacement from softmax(scores) (Gumbel top-k), then
    # ordered by score, as transformers' multinomial draw followed by a sort
    gumbel = jax.random.gumbel(jax.random.fold_in(key, length), scores.shape)
    index = jax.lax.top_k(scores + gumbel, keep)[1]
    values = jnp.take_along_axis(scores, index, axis=-1)
    order = jnp.argsort(-values, axis=-1)
    return jnp.take_along_axis(values, order, axis=-1), jnp.take_along_axis(index, order, axis=-1)


def _length_factor(length: jax.Array, length_penalty: jax.Array) -> jax.Array:
    return jnp.asarray(length, jnp.float32) ** length_penalty


def _advance(run: Run, s: BeamState, logits: jax.Array) -> BeamState:
    """One beam step from the running beams' next-token logits (batch * beams, vocab)."""
    static, knobs, prompt = run.static, run.knobs, run.prompt_length
    batch, beams, buffer = s.running.shape
    vocab = logits.shape[-1]
    stop_ids = static.eos_token_id
    keep = max(2, 1 + len(stop_ids)) * beams

    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    log_probs = logits_lib.process(log_probs, s.running.reshape(batch * beams, buffer), run.written(s.length),
                                   s.length, static, knobs, min_keep=len(stop_ids) + 1)
    scores = (log_probs.reshape(batch, beams, vocab) + s.running_scores[..., None]).reshape(batch, -1)
    values, index = _top_candidates(run, scores, keep, s.key, s.length)
    origin, token = index // vocab, (index % vocab).astype(s.running.dtype)
    candidates = jax.lax.dynamic_update_slice_in_dim(_gather(s.running, origin), token[..., None], s.length,
                                                     axis=2)
    ends = is_stop(token, stop_ids) | (s.length + 1 >= knobs.max_length)

    # the best `beams` candidates that do not end run on
    running_values = values + ends.astype(jnp.float32) * _NEG
    best = jax.lax.top_k(running_values, beams)[1]
    running = _gather(candidates, best)
    running_scores = jnp.take_along_axis(running_values, best, axis=1)
    running_origin = jnp.take_along_axis(origin, best, axis=1)

    # candidates among the best `beams` that end may displace finished hypotheses
    just_ended = ends & (jnp.arange(keep) < beams)[None]
    generated = s.length + 1 - prompt
    final = values / _length_factor(generated, knobs.length_penalty)
    if static.early_stopping is True:
        final = final + jnp.all(s.is_done, axis=1, keepdims=True).astype(jnp.float32) * _NEG
    final = final + (~s.improvable)[:, None].astype(jnp.float32) * _NEG
    final = final + (~just_ended).astype(jnp.float32) * _NEG
    merged_scores = jnp.concatenate([s.done_scores, final], axis=1)
    top = jax.lax.top_k(merged_scores, beams)[1]
    pick = lambda a, b: _gather(jnp.concatenate([a, b], axis=1), top)
    done = pick(s.done, candidates)
    done_lengths = pick(s.done_lengths, jnp.full(final.shape, generated, jnp.int32))
    is_done = pick(s.is_done, just_ended)
    done_scores = jnp.take_along_axis(merged_scores, top, axis=1)

    cache = cache_layout.reorder_beams(s.cache, run.decoder.cache_layout, running_origin)
    length = s.length + 1
    improvable = s.improvable & _may_improve(run, running_scores, done_scores, is_done, length)
    return BeamState(by_rows(running), by_rows(running_scores), by_rows(done), by_rows(done_scores),
                     by_rows(done_lengths), by_rows(is_done), improvable, jnp.all(ends), length,
                     s.positions, run.constrain_cache(cache), s.key)


def _may_improve(run: Run, running_scores, done_scores, is_done, length) -> jax.Array:
    """transformers' early-stop heuristic: the best running beam, scored at the current length
    (early_stopping="never" with a positive length penalty: at the length bound), against the
    worst finished hypothesis."""
    knobs, prompt = run.knobs, run.prompt_length
    hypothetical = length - prompt
    if run.static.early_stopping == "never":
        hypothetical = jnp.where(knobs.length_penalty > 0.0, knobs.max_length - prompt, hypothetical)
    best_running = running_scores[:, :1] / _length_factor(hypothetical, knobs.length_penalty)
    worst_done = jnp.where(is_done, jnp.min(done_scores, axis=1, keepdims=True), _NEG)
    return jnp.any(best_running > worst_done, axis=1)


def beam_search(run: Run, sequences: jax.Array, logits: jax.Array, cache: Any, positions: jax.Array,
                key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Beam search from prefilled rows laid out as (batch * beams) identical copies; `logits`
    (batch * beams, vocab) predict the first new token. Returns the best
    `num_return_sequences` hypotheses per example, best first: (sequences, generated lengths,
    length-penalised scores), each with batch * num_return_sequences rows."""
    beams = run.static.num_beams
    batch = sequences.shape[0] // beams
    running = sequences.reshape(batch, beams, -1)
    first_only = jnp.where(jnp.arange(beams) == 0, 0.0, _NEG)    # the copies start as one beam
    state = BeamState(
        running, jnp.broadcast_to(first_only, (batch, beams)), running, jnp.full((batch, beams), _NEG),
        jnp.zeros((batch, beams), jnp.int32), jnp.zeros((batch, beams), bool), jnp.ones(batch, bool),
        jnp.array(False), jnp.int32(run.prompt_length), positions, cache, key)
    state = _advance(run, state, logits)

    def unfinished(s: BeamState) -> jax.Array:
        all_full = jnp.all(s.is_done) if run.static.early_stopping is True else jnp.array(False)
        return jnp.any(s.improvable) & ~all_full & ~s.all_ended

    def next_token(s: BeamState) -> BeamState:
        flat = s.running.reshape(batch * beams, -1)
        logits, cache = run.step(s.cache, flat, s.length, s.positions)
        return _advance(run, s._replace(cache=cache, positions=s.positions + 1), logits)

    state = jax.lax.while_loop(unfinished, next_token, state)
    returned = run.static.num_return_sequences
    flat = lambda x: x[:, :returned].reshape((batch * returned,) + x.shape[2:])
    return flat(state.done), flat(state.done_lengths), flat(state.done_scores)
