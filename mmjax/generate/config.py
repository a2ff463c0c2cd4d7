"""What to generate: transformers' `generate` options, split into the part that shapes the
compiled program (static) and the numbers that only feed it (traced), so that asking for another
length, temperature or penalty reuses the compiled loop."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax.numpy as jnp

EARLY_STOPPING = (True, False, "never")


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Decoding options, with transformers' names and meanings.

    Lengths: `max_new_tokens` (or `max_length`, prompt included) bounds the output; `min_length`
    (prompt included) / `min_new_tokens` forbid the stop tokens before then. Lengths count the
    padded prompt width, as transformers counts `input_ids.shape[-1]`.
    Search: greedy (default), `do_sample` (temperature, top_k, top_p), `num_beams` > 1 (beam
    search, or beam sampling with `do_sample`) with `length_penalty` (score / generated
    length ** length_penalty) and `early_stopping` (True: stop a row once num_beams hypotheses are
    done; False: stop when the best running beam, scored at the current length, cannot beat the
    worst done one; "never": the same test at the most favourable length).
    `repetition_penalty` divides positive (multiplies negative) scores of tokens already in the
    sequence (prompt padding excluded). `eos_token_id`: one id or several; finished rows and
    unused positions hold `pad_token_id`.
    """

    max_new_tokens: int | None = None
    max_length: int | None = None
    min_length: int = 0
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    repetition_penalty: float = 1.0
    num_return_sequences: int = 1
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int = 0

    def __post_init__(self):
        eos = self.eos_token_id
        if eos is not None:
            eos = (int(eos),) if isinstance(eos, int) else tuple(int(e) for e in eos)
            object.__setattr__(self, "eos_token_id", eos or None)
        problems = []
        if self.max_new_tokens is None and self.max_length is None:
            problems.append("set max_new_tokens or max_length")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if min(self.min_length, self.min_new_tokens) < 0:
            problems.append("min_length and min_new_tokens must be >= 0")
        if self.num_beams < 1:
            problems.append(f"num_beams must be >= 1, got {self.num_beams}")
        most = self.num_beams if self.num_beams > 1 else (1 << 30 if self.do_sample else 1)
        if not 1 <= self.num_return_sequences <= most:
            problems.append(f"num_return_sequences ({self.num_return_sequences}) must be in [1, num_beams] "
                            "for beam search and 1 for greedy decoding")
        if self.temperature <= 0:
            problems.append(f"temperature must be > 0 (use greedy decoding for 0), got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            problems.append(f"top_k must be >= 0 and top_p in (0, 1], got {self.top_k}, {self.top_p}")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.early_stopping not in EARLY_STOPPING:
            problems.append(f"early_stopping must be one of {EARLY_STOPPING}, got {self.early_stopping!r}")
        if problems:
            raise ValueError("Invalid GenerationConfig: " + "; ".join(problems))

    def replace(self, **changes: Any) -> GenerationConfig:
        return dataclasses.replace(self, **changes)

    def total_length(self, prompt_length: int) -> int:
        """The output length bound, prompt included (max_new_tokens wins, as in transformers)."""
        if self.max_new_tokens is not None:
            return prompt_length + self.max_new_tokens
        return int(self.max_length)

    def static(self) -> Static:
        """The options that shape the program; sampling filters only matter when sampling."""
        sampling = self.do_sample
        return Static(num_beams=self.num_beams, do_sample=sampling, eos_token_id=self.eos_token_id or (),
                      pad_token_id=self.pad_token_id, early_stopping=self.early_stopping,
                      num_return_sequences=self.num_return_sequences,
                      top_k=self.top_k if sampling else 0, top_p=sampling and self.top_p < 1.0,
                      repetition_penalty=self.repetition_penalty != 1.0)

    def knobs(self, prompt_length: int) -> Knobs:
        """The traced numbers; the minimum lengths become one total-length bound."""
        min_length = max(self.min_length, prompt_length + self.min_new_tokens if self.min_new_tokens else 0)
        return Knobs(max_length=jnp.int32(self.total_length(prompt_length)), min_length=jnp.int32(min_length),
                     temperature=jnp.float32(self.temperature), top_p=jnp.float32(self.top_p),
                     repetition_penalty=jnp.float32(self.repetition_penalty),
                     length_penalty=jnp.float32(self.length_penalty))


class Static(NamedTuple):
    """The options that change the compiled program (hashable: a jit static argument)."""
    num_beams: int
    do_sample: bool
    eos_token_id: tuple[int, ...]
    pad_token_id: int
    early_stopping: bool | str
    num_return_sequences: int
    top_k: int                   # 0: off (a static k for lax.top_k)
    top_p: bool                  # nucleus filtering on
    repetition_penalty: bool     # the penalty on


class Knobs(NamedTuple):
    """Traced scalars: changing them reuses the compiled program."""
    max_length: Any
    min_length: Any
    temperature: Any
    top_p: Any
    repetition_penalty: Any
    length_penalty: Any
