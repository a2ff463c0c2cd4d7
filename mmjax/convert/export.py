"""What an exporter returns when a table alone does not describe the target format.

Most targets are one table (and, for transformers, a config.json). Some need more: MAE's
targets store fixed sin-cos position tables that mmjax recomputes instead of keeping as
parameters, and timm holds only MAE's encoder, so the decoder is left out on purpose.
`Export` says so explicitly, so that nothing is dropped or added silently.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from mmjax import param_paths
from mmjax.convert.engine import ConversionError, Table, to_torch


@dataclasses.dataclass(frozen=True)
class Export:
    """table: mmjax params -> torch keys.  hf_config: config.json for a transformers folder.
    drop: regular expressions of mmjax parameter paths the target has no place for (the
    exporter's notes say why).  fixed: torch tensors the target stores but mmjax does not
    (recomputed buffers).  notes: what the user should know about the written file."""

    table: Table
    hf_config: dict | None = None
    drop: tuple[str, ...] = ()
    fixed: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def state_dict(self, params: Mapping[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
        """The torch state dict of flat, unscanned mmjax params."""
        kept = {p: v for p, v in params.items() if not param_paths.fullmatch_any(self.drop, p)}
        state = to_torch(kept, self.table, what=what)
        clash = sorted(set(state) & set(self.fixed))
        if clash:
            raise ConversionError(f"{what}: {clash} written both from parameters and as fixed tensors")
        return {**state, **self.fixed}


def as_export(spec: Export | tuple[Table, dict | None]) -> Export:
    """Exporters may return an `Export` or the plain (table, hf_config) pair."""
    return spec if isinstance(spec, Export) else Export(*spec)
