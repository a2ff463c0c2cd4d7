"""Shapes-only checks of a conversion table at real size (the published models do not fit this
machine): which mmjax parameter each torch key fills and with which shape, both ways, without
reading or making any array."""

from mmjax.convert import engine


def imported_paths(state: dict, table: engine.Table, expected: dict) -> list:
    """The mmjax path each torch key fills, checked by shape as engine.to_mmjax checks before reading
    any array: the table's transform gives the torch shape the model's parameter needs."""
    paths = []
    for key, shape in state.items():
        found = [(r, m) for r, m in ((r, t.fullmatch(key)) for r, t in zip(table.rules, table._torch_res)) if m]
        assert found, f"no rule for {key}"
        rl, match = found[0]
        (path,) = [p.format(**match.groupdict()) for p in rl.mmjax_paths]
        assert path in expected, f"{key}: the model has no {path}"
        assert rl.transform.torch_shape(expected[path]) == shape, f"{key}: {shape} for {path} {expected[path]}"
        paths.append(path)
    return paths


def exported_shapes(expected: dict, table: engine.Table) -> dict:
    """torch key -> shape that each mmjax parameter is written as (the first exportable rule, as to_torch)."""
    out = {}
    for path, shape in expected.items():
        found = [(r, m) for r, regexes in zip(table.rules, table._mmjax_res) if r.export
                 for m in (regexes[0].fullmatch(path),) if m]
        assert found, f"no rule writes {path}"
        rl, match = found[0]
        out[rl.torch_key.format(**match.groupdict())] = rl.transform.torch_shape(shape)
    return out


def unrolled_shapes(scanned: dict) -> dict:
    """Flat shapes of a scanned model's parameters in the unrolled layout (tracing a scanned model is
    fast: one layer per stack): each layer's shape is the stack's without the leading layer axis."""
    from mmjax import param_paths

    return {layer: tuple(s.shape[1:]) if param_paths.is_stacked(p) else tuple(s.shape)
            for p, s in scanned.items()
            for layer in param_paths.unstacked_paths(p, s.shape[0] if param_paths.is_stacked(p) else 1)}
