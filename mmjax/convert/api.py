"""Checkpoint conversion in both directions: which table serves which source and target."""

from __future__ import annotations

import numpy as np

from mmjax import pretrained
from mmjax.convert import beit, clip, dvae, engine, io, mae, vit
from mmjax.convert.export import Export, as_export

SOURCES = ("timm", "open_clip", "hf", "dall_e")
HF_ARCHITECTURES = {"ViTModel": vit.from_hf, "ViTForImageClassification": vit.from_hf, "CLIPModel": clip.from_hf,
                    "ViTMAEForPreTraining": mae.from_hf, "BeitForMaskedImageModeling": beit.from_hf,
                    "BeitForImageClassification": beit.from_hf, "FlavaImageCodebook": dvae.from_hf}
HF_MODEL_TYPES = {"vit": "ViTModel", "clip": "CLIPModel", "vit_mae": "ViTMAEForPreTraining",
                  "flava_image_codebook": "FlavaImageCodebook"}
# (mmjax model class, target library) -> function(model_config) -> (table, HF config.json or None) or an
# export.Export (when the target also stores fixed tensors or has no place for some parameters)
EXPORTS = {
    (vit.VIT, "timm"): vit.timm_export,
    (vit.VIT, "hf"): vit.hf_export,
    (clip.CLIP, "open_clip"): clip.open_clip_export,
    (clip.CLIP, "hf"): clip.hf_export,
    (beit.BEIT, "timm"): beit.timm_export,
    (beit.BEIT, "hf"): beit.hf_export,
    (mae.MAE, "hf"): mae.hf_export,
    (mae.MAE, "timm"): mae.timm_export,
    (dvae.ENCODER, "dall_e"): dvae.dall_e_export,
    (dvae.DECODER, "dall_e"): dvae.dall_e_export,
}


def plan_import(source: str, checkpoint: str, model: str | None = None) -> tuple[engine.Plan, dict]:
    """(plan, state dict) for a source checkpoint; the model name is checked before the file is read."""
    if source not in SOURCES:
        raise engine.ConversionError(f"Unknown source {source!r}; known: {SOURCES}")
    if source == "hf":
        config, state = io.read_hf_folder(checkpoint)
        arch = (config.get("architectures") or [HF_MODEL_TYPES.get(config.get("model_type"), "")])[0]
        if arch not in HF_ARCHITECTURES:
            raise engine.ConversionError(f"Unsupported Hugging Face architecture {arch or config.get('model_type')!r} "
                                         f"in {checkpoint}/config.json; supported: {sorted(HF_ARCHITECTURES)}")
        return HF_ARCHITECTURES[arch](config, state), state
    if not model:
        raise engine.ConversionError(f"--model is required for --source {source}")
    if source == "timm":
        family = beit if model.startswith("beit") else vit
        family.timm_architecture(model)
        state = io.read_state_dict(checkpoint)
        return family.from_timm(model, state), state
    if source == "dall_e":
        dvae.dall_e_model(model)
        state = io.read_state_dict(checkpoint)
        return dvae.from_dall_e(model, state), state
    clip.open_clip_config(model)
    state = io.read_state_dict(checkpoint)
    return clip.from_open_clip(model, state), state


def import_checkpoint(source: str, checkpoint: str, output: str, model: str | None = None, *,
                      scan: bool = False, overwrite: bool = False) -> engine.Plan:
    """Converts a PyTorch checkpoint into an mmjax model directory (see mmjax.pretrained)."""
    plan, state = plan_import(source, checkpoint, model)
    module = pretrained.build(plan.model_class, plan.fields)
    expected = pretrained.abstract_params(module, plan.inputs)
    flat = engine.to_mmjax(state, plan.table, expected, what=f"{source} checkpoint {checkpoint}")
    del state
    if scan:
        fields = pretrained.with_overrides(type(module), plan.fields, {"scan": True})
        module = pretrained.build(plan.model_class, fields)
        flat = engine.stack_layers(flat)
    pretrained.save(output, module, engine.unflatten(flat), plan.inputs, plan.source, overwrite=overwrite)
    return plan


def plan_export(target: str, directory: str) -> Export:
    """How a model directory becomes a `target` checkpoint (with notes for the user); raises when
    the target cannot express the model. Reads only model_config.json."""
    config = pretrained.read_config(directory)
    exporter = EXPORTS.get((config["class"], target))
    if exporter is None:
        known = sorted(t for c, t in EXPORTS if c == config["class"])
        raise engine.ConversionError(f"Cannot write {config['class']} as {target!r}; targets for it: {known}")
    return as_export(exporter(config))


def export_checkpoint(target: str, directory: str, output: str) -> dict[str, np.ndarray]:
    """Writes an mmjax model directory as a `target` state dict file (for hf: a model folder)."""
    spec = plan_export(target, directory)
    unscanned = {"scan": False} if "scan" in pretrained.read_config(directory)["fields"] else {}   # dVAE: no stack
    _, params = pretrained.load_arrays(directory, **unscanned)
    state = spec.state_dict(params, what=f"{target} state dict")
    if target == "hf":
        io.write_hf_folder(output, spec.hf_config, state)
    else:
        io.write_state_dict(output, state)
    return state
