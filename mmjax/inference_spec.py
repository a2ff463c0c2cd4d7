"""What a model needs around it at inference: image preprocessing, tokenizer, class names.

Model directories and runs store it in model_config.json as optional keys:
    "preprocess"   an mmjax pp string from a decoded uint8 HWC RGB image (key "image") to the
                   model's input, e.g. "resize_small(224, 'bicubic')|central_crop(224)|normalize('clip')"
    "tokenizer"    a spec for mmjax.data.tokenizers.build_tokenizer, e.g. {"name": "clip", "context_length": 77}
    "class_names"  list of str (classifiers and zero-shot defaults), when known
`spec(model_config)` reads them, or, for directories written before they existed, derives them
from the recorded source the way `for_source` does at conversion time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from mmjax.data import image_ops, preprocess

KEYS = ("preprocess", "tokenizer", "class_names")
CLIP_CLASS = "mmjax.models.clip.CLIP"
# pp ops that do not act on the decoded image: dropped from an evaluation pp.
NON_IMAGE_OPS = ("decode", "tokenize", "keep", "rename")
# PIL resample codes in transformers' preprocessor_config.json -> mmjax resize methods.
HF_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic", 4: "area"}


def kind(model_config: Mapping) -> str:
    """"contrastive" (CLIP), "classifier" (a head with num_classes) or "other"."""
    if model_config["class"] == CLIP_CLASS:
        return "contrastive"
    return "classifier" if model_config["fields"].get("num_classes") else "other"


def spec(model_config: Mapping, timm_lookup: bool = True) -> dict:
    """{"preprocess", "tokenizer", "class_names", "kind"} of a model directory's or run's config.

    A timm checkpoint's transform is looked up in timm's pretrained configs here, when it is
    used (unless `timm_lookup=False`), rather than at conversion: importing timm imports
    torch, and converting a .safetensors file needs neither."""
    stored = model_config if any(k in model_config for k in KEYS) else for_source(model_config)
    out = {**{k: stored.get(k) for k in KEYS}, "kind": kind(model_config)}
    source, size = model_config.get("source") or {}, image_size(model_config)
    if timm_lookup and out["preprocess"] is None and source.get("library") == "timm" and size is not None:
        out["preprocess"] = timm_pp(source.get("model", ""), size)
    return out


def image_pp(pp: str | None) -> str | None:
    """An evaluation pp without the ops that do not act on the decoded image (decode,
    tokenize, keep, rename, and ops on other keys); None when nothing is left."""
    if not pp:
        return None
    kept = []
    for op in preprocess.split_ops(pp):
        name, _, kwargs = preprocess.parse_op(op)
        if name not in NON_IMAGE_OPS and kwargs.get("key", "image") == "image":
            kept.append(op)
    return "|".join(kept) or None


def normalize_op(mean: Sequence[float], std: Sequence[float]) -> str:
    """The pp op for (x/255 - mean) / std: a preset name when one matches."""
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if all(math.isclose(v, 0.5) for v in mean + std):
        return "value_range(-1, 1)"                 # (x/255 - 0.5) / 0.5, the same numbers
    for name, (m, s) in image_ops.NORMALIZE_PRESETS.items():
        if all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(mean + std, m + s)):
            return f"normalize('{name}')"
    return f"normalize({mean}, {std})"


def center_crop_pp(size: int, crop_pct: float = 0.875, method: str = "bicubic",
                   mean: Sequence[float] = image_ops.NORMALIZE_PRESETS["imagenet"][0],
                   std: Sequence[float] = image_ops.NORMALIZE_PRESETS["imagenet"][1]) -> str:
    """timm's evaluation transform: short side to floor(size / crop_pct), centre crop, normalise."""
    return (f"resize_small({math.floor(size / crop_pct)}, '{method}')|central_crop({size})|"
            + normalize_op(mean, std))


def clip_pp(size: int) -> str:
    return f"resize_small({size}, 'bicubic')|central_crop({size})|normalize('clip')"


def siglip_pp(size: int) -> str:
    """SigLIP's (open_clip / big_vision): the whole image squashed to size × size, values in [-1, 1]
    (mean = std = 0.5)."""
    return f"resize({size}, 'bicubic')|value_range(-1,1)"


def is_siglip(model_config: Mapping) -> bool:
    """A CLIP-class model with SigLIP's learned logit bias."""
    return model_config["class"] == CLIP_CLASS and model_config["fields"].get("logit_bias_init") is not None


def hf_pp(processor: Mapping) -> str | None:
    """A transformers preprocessor_config.json as a pp string; None when it says nothing usable."""
    ops = []
    method = HF_RESAMPLE.get(processor.get("resample", 3), "bicubic")
    size = processor.get("size")
    if processor.get("do_resize", True) and size is not None:
        if isinstance(size, Mapping) and "shortest_edge" in size:
            ops.append(f"resize_small({int(size['shortest_edge'])}, '{method}')")
        elif isinstance(size, Mapping) and {"height", "width"} <= set(size):
            ops.append(f"resize(({int(size['height'])}, {int(size['width'])}), '{method}')")
        elif isinstance(size, int):
            ops.append(f"resize({size}, '{method}')")
        else:
            return None
    crop = processor.get("crop_size")
    if processor.get("do_center_crop") and crop is not None:
        crop = (crop["height"], crop["width"]) if isinstance(crop, Mapping) else (crop, crop)
        ops.append(f"central_crop(({int(crop[0])}, {int(crop[1])}))")
    if processor.get("do_rescale", True) and processor.get("do_normalize", True):
        if not math.isclose(float(processor.get("rescale_factor", 1 / 255)), 1 / 255):
            return None
        ops.append(normalize_op(processor.get("image_mean", (0.5,) * 3), processor.get("image_std", (0.5,) * 3)))
    return "|".join(ops) or None


def image_size(model_config: Mapping) -> int | None:
    """The (square) image side of the model's first image input."""
    shape = next((s["shape"] for s in model_config["inputs"] if len(s["shape"]) == 4), None)
    return int(shape[1]) if shape is not None and shape[1] == shape[2] else None


def hf_class_names(hf_config: Mapping) -> list[str] | None:
    """id2label of a transformers config.json, unless it holds only LABEL_i placeholders."""
    id2label = hf_config.get("id2label") or {}
    names = [id2label[k] for k in sorted(id2label, key=int)] if id2label else []
    return names if names and names != [f"LABEL_{i}" for i in range(len(names))] else None


def timm_pp(model: str, size: int) -> str:
    """timm's eval transform for a model name (its pretrained config when timm is installed)."""
    try:
        from timm.models import get_pretrained_cfg
        cfg = get_pretrained_cfg(model)
    except Exception:   # noqa: BLE001 - timm missing or the name unknown to it: timm's defaults
        cfg = None
    if cfg is None or cfg.input_size[-1] != size or getattr(cfg, "crop_mode", "center") != "center":
        return center_crop_pp(size)
    method = cfg.interpolation if cfg.interpolation in ("bicubic", "bilinear", "nearest") else "bicubic"
    return center_crop_pp(size, cfg.crop_pct, method, cfg.mean, cfg.std)


def for_source(model_config: Mapping, hf_processor: Mapping | None = None) -> dict[str, Any]:
    """Inference keys of a converted checkpoint, from its source library and model."""
    source, size = model_config.get("source") or {}, image_size(model_config)
    library, out = source.get("library"), dict.fromkeys(KEYS)
    clip, siglip = model_config["class"] == CLIP_CLASS, is_siglip(model_config)
    if clip and not siglip:   # SigLIP's SentencePiece tokenizer is not carried over: none is recorded
        out["tokenizer"] = {"name": "clip", "context_length": int(model_config["fields"]["text"]["context_length"])}
    if size is None or library not in ("timm", "open_clip", "hf"):
        return out
    if clip:
        out["preprocess"] = siglip_pp(size) if siglip else clip_pp(size)
    elif library == "timm":
        out["preprocess"] = None        # resolved by `spec` when used (timm's table imports torch)
    else:
        out["preprocess"] = center_crop_pp(size)
    if library == "hf":
        out["preprocess"] = (hf_processor and hf_pp(hf_processor)) or out["preprocess"]
        if kind(model_config) == "classifier":
            out["class_names"] = hf_class_names(source.get("config") or {})
    return out
