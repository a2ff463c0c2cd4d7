"""DALL-E dVAE tables: OpenAI's `dall_e` Encoder / Decoder state dicts and Hugging Face
`FlavaImageCodebook` -> mmjax `DVAEEncoder` / `DVAEDecoder`.

Only conv layers, so every key is a plain OIHW <-> HWIO conv (the decoder's 1x1 input conv over
one-hot tokens keeps that shape in mmjax too). OpenAI publishes whole pickled modules
(encoder.pkl / decoder.pkl); convert `dall_e.load_model(...).state_dict()` saved with torch.save.
"""

from __future__ import annotations

import re

import numpy as np

from mmjax.convert.engine import CONV, ConversionError, Plan, Table, rule
from mmjax.pretrained import input_spec

ENCODER = "mmjax.models.dvae.DVAEEncoder"
DECODER = "mmjax.models.dvae.DVAEDecoder"
DALL_E_MODELS = ("encoder", "decoder")


def _table(weight: str, bias: str, group: str, res_path: str) -> Table:
    """`group` / `res_path` are the module paths that FLAVA adds (`group.`, `path.`) or not."""
    def conv(src: str, dst: str):
        return [rule(f"{src}.{weight}", f"{dst}/kernel", CONV), rule(f"{src}.{bias}", f"{dst}/bias")]
    block = f"blocks.group_{{g}}.{group}block_{{b}}"
    return Table((
        *conv("blocks.input", "input"),
        *conv(f"{block}.id_path", "group_{g}_block_{b}/id_path"),
        *conv(f"{block}.res_path.{res_path}conv_{{k}}", "group_{g}_block_{b}/conv_{k}"),
        *conv("blocks.output.conv", "output"),
    ))


DALL_E_TABLE = _table("w", "b", "", "")
FLAVA_TABLE = _table("weight", "bias", "group.", "path.")


def _blocks_per_group(state: dict[str, np.ndarray]) -> int:
    blocks = {m[1] for k in state if (m := re.match(r"blocks\.group_1\.(?:group\.)?block_(\d+)\.", k))}
    if not blocks:
        raise ConversionError("Not a DALL-E dVAE state dict: no blocks.group_1.block_* keys")
    return len(blocks)


def _get(state: dict[str, np.ndarray], key: str, what: str) -> np.ndarray:
    if key not in state:
        raise ConversionError(f"Not a DALL-E dVAE {what} state dict: {key} is missing")
    return state[key]


def from_dall_e(name: str, state: dict[str, np.ndarray]) -> Plan:
    """`name` is "encoder" or "decoder": which of the two DALL-E modules the file holds."""
    dall_e_model(name)
    source = {"library": "dall_e", "model": name}
    if name == "encoder":
        first = _get(state, "blocks.input.w", name)            # (n_hid, channels, 7, 7)
        fields = {"n_hid": int(first.shape[0]), "blocks_per_group": _blocks_per_group(state),
                  "vocab_size": int(_get(state, "blocks.output.conv.w", name).shape[0]),
                  "in_channels": int(first.shape[1])}
        return Plan(ENCODER, fields, [input_spec((1, 256, 256, fields["in_channels"]))], DALL_E_TABLE, source)
    first = _get(state, "blocks.input.w", name)                # (n_init, vocab, 1, 1)
    fields = {"n_init": int(first.shape[0]), "vocab_size": int(first.shape[1]),
              "n_hid": int(_get(state, "blocks.group_1.block_1.id_path.w", name).shape[0]) // 8,
              "blocks_per_group": _blocks_per_group(state),
              "out_channels": int(_get(state, "blocks.output.conv.w", name).shape[0]) // 2}
    return Plan(DECODER, fields, [input_spec((1, 32, 32), "int32")], DALL_E_TABLE, source)


def dall_e_model(name: str) -> None:
    if name not in DALL_E_MODELS:
        raise ConversionError(f"Unknown dall_e model {name!r}: --model must be one of {DALL_E_MODELS}")


def dall_e_export(config: dict) -> tuple[Table, None]:
    """Both dVAE halves write OpenAI's `dall_e` key names."""
    return DALL_E_TABLE, None


def from_hf(config: dict, state: dict[str, np.ndarray]) -> Plan:
    """FlavaImageCodebook: the DALL-E encoder (FLAVA's processor maps pixels; mmjax maps them inside)."""
    get = config.get
    if get("num_groups", 4) != 4:
        raise ConversionError(f"FlavaImageCodebook with num_groups={get('num_groups')} is not supported (DALL-E has 4)")
    fields = {"n_hid": get("hidden_size", 256), "blocks_per_group": get("num_blocks_per_group", 2),
              "vocab_size": get("vocab_size", 8192), "in_channels": get("input_channels", 3)}
    notes = [("mmjax's DVAEEncoder takes images in [0, 1] and applies DALL-E's map_pixels itself; "
              "FlavaImageCodebook expects pixels already mapped by FLAVA's processor")]
    return Plan(ENCODER, fields, [input_spec((1, 256, 256, fields["in_channels"]))], FLAVA_TABLE,
                {"library": "hf", "architecture": "FlavaImageCodebook", "config": config}, notes)
