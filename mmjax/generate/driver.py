"""`Generator`: one jitted program per decoder and search kind that prefills the prompt, then
loops (`jax.lax.while_loop`) over fixed-size buffers — a token buffer and a cache of
`max_length` positions — so no step and no requested length compiles anew.

Prompts are padded on either side (a `prompt_mask` marks real tokens); each row is left-aligned
first, so every row's last prompt token sits at the same position and positions count real
tokens only: a padded row generates what it would alone. Under a mesh the batch is split over the
data axes and the cache follows the activations' logical axes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from mmjax import sharding
from mmjax.generate.beam_search import beam_search
from mmjax.generate.cache_layout import repeat_rows
from mmjax.generate.config import GenerationConfig, Knobs, Static
from mmjax.generate.decoder import Decoder
from mmjax.generate.loop import Run, by_rows
from mmjax.generate.sampling import sample


class GenerationOutput(NamedTuple):
    """`sequences` (rows, max_length): each row's prompt, left-aligned (padding first, as
    transformers returns left-padded prompts), then the generated tokens, pad after a stop token
    and after the length bound. `lengths`: generated tokens, a stop token included. `scores`:
    beam search's length-penalised score, else the log-probability of the generated tokens.
    With beams / several samples, rows are example-major (example i: rows i*n .. i*n+n-1)."""
    sequences: jax.Array
    lengths: jax.Array
    scores: jax.Array
    prompt_length: int

    @property
    def generated(self) -> jax.Array:
        """(rows, max_length - prompt width): the tokens after the prompt."""
        return self.sequences[:, self.prompt_length:]


def left_align(tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Moves each row's real tokens (in order) to the end of the row, padding to the front."""
    order = jnp.argsort(mask.astype(jnp.int32), axis=1, stable=True)
    return jnp.take_along_axis(tokens, order, axis=1), jnp.take_along_axis(mask, order, axis=1)


class Generator:
    """Generation for one `Decoder` with a cache of `max_length` positions (prompt included).

    `generator(params, prompt, config, prompt_mask=..., inputs=..., key=...)` returns a
    `GenerationOutput`. Compiled once per search kind (GenerationConfig.static()) and prompt /
    batch shape; lengths, temperature, top_p and penalties are traced. With `mesh`, calls run
    under it and the sharding `rules` (preset name or rules), which are thus part of the
    generator, not of the caller's context; `traces` counts compilations.
    """

    def __init__(self, decoder: Decoder, max_length: int, *, mesh: Mesh | None = None,
                 rules: str | Any = "dp"):
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (a prompt token and a new one), got {max_length}")
        self.decoder, self.max_length, self.mesh = decoder, int(max_length), mesh
        self.rules = sharding.get_rules(rules) if mesh is not None else None
        self.traces = 0
        self._jitted = jax.jit(self._generate, static_argnames="static")

    def __call__(self, params: Any, prompt: jax.Array, config: GenerationConfig, *,
                 prompt_mask: jax.Array | None = None, inputs: Mapping[str, jax.Array] | None = None,
                 key: jax.Array | None = None) -> GenerationOutput:
        args, static = self._arguments(prompt, config, prompt_mask, inputs, key)
        with self._context():
            sequences, lengths, scores = self._jitted(params, *args, static=static)
        return GenerationOutput(sequences, lengths, scores, args[0].shape[1])

    def lower(self, params: Any, prompt: jax.Array, config: GenerationConfig, *,
              prompt_mask: jax.Array | None = None, inputs: Mapping[str, jax.Array] | None = None,
              key: jax.Array | None = None) -> jax.stages.Lowered:
        """The program a call with these arguments runs (e.g. `.compile().memory_analysis()`)."""
        args, static = self._arguments(prompt, config, prompt_mask, inputs, key)
        with self._context():
            return self._jitted.lower(params, *args, static=static)

    def _context(self):
        if self.mesh is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    def _arguments(self, prompt, config: GenerationConfig, prompt_mask, inputs, key) -> tuple[tuple, Static]:
        """The checked arguments of the jitted program, and its static options."""
        prompt = jnp.asarray(prompt)
        if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer) or prompt.shape[1] < 1:
            raise ValueError(f"prompt must be integer token ids (batch, length >= 1), got {prompt.dtype} "
                             f"{prompt.shape}")
        batch, width = prompt.shape
        prompt_mask = jnp.ones(prompt.shape, bool) if prompt_mask is None else jnp.asarray(prompt_mask, bool)
        if prompt_mask.shape != prompt.shape:
            raise ValueError(f"prompt_mask {prompt_mask.shape} must match the prompt {prompt.shape}")
        if not bool(jnp.all(jnp.any(prompt_mask, axis=1))):
            raise ValueError("Every prompt needs at least one real token (a row of prompt_mask is all False); "
                             "start empty prompts with a BOS / decoder start token")
        inputs = dict(inputs or {})
        for name, value in inputs.items():
            if jnp.shape(value)[:1] != (batch,):
                raise ValueError(f"Input {name!r} {jnp.shape(value)} must have the prompt's batch {batch} first")
        total = config.total_length(width)
        if total > self.max_length:
            raise ValueError(f"This request needs {total} positions (prompt width {width} + new tokens) but the "
                             f"cache holds {self.max_length}: lower max_new_tokens / max_length or build the "
                             f"Generator with max_length >= {total}")
        if total <= width:
            raise ValueError(f"max_length {total} leaves no room after the prompt of width {width}")
        if config.do_sample and key is None:
            raise ValueError("Sampling needs a jax random key (key=...)")
        key = jax.random.key(0) if key is None else key
        return (prompt, prompt_mask, inputs, key, config.knobs(width)), config.static()

    def _generate(self, params, prompt, prompt_mask, inputs, key, knobs: Knobs, *, static: Static):
        self.traces += 1
        prompt, prompt_mask = left_align(prompt, prompt_mask)
        batch, width = prompt.shape
        copies = static.num_beams if static.num_beams > 1 else static.num_return_sequences
        positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0).astype(jnp.int32)
        fill = jnp.full((batch, self.max_length - width), static.pad_token_id, prompt.dtype)
        sequences = by_rows(jnp.concatenate([prompt, fill], axis=1))
        key_mask = jnp.concatenate([prompt_mask, jnp.ones(fill.shape, bool)], axis=1)
        next_position = prompt_mask.sum(axis=1).astype(jnp.int32)

        decoder = self.decoder
        cache = decoder.init_cache(params, batch, self.max_length, inputs)
        run = Run(decoder, params, by_rows(key_mask), inputs, static, knobs, width)
        cache = run.constrain_cache(cache)
        logits, cache = decoder.prefill(params, cache, by_rows(prompt), by_rows(positions), run.key_mask, inputs)
        logits = logits[:, -1]
        if copies > 1:     # beams or samples per example: copy the prefilled rows
            repeat = lambda x: by_rows(jnp.repeat(x, copies, axis=0))
            sequences, logits, next_position = map(repeat, (sequences, logits, next_position))
            run = Run(decoder, params, repeat(key_mask), jax.tree.map(repeat, inputs), static, knobs, width)
            cache = run.constrain_cache(repeat_rows(cache, decoder.cache_layout, copies))
        search = beam_search if static.num_beams > 1 else sample
        return search(run, sequences, logits, cache, next_position, key)
