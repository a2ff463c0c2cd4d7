"""Checkpoint conversion in both directions: which table serves which source and target.

Exports read a model directory or a training workdir (`mmjax.runs`: the run's model at its
newest good checkpoint or `step`); `save_run` turns a run into a model directory.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from mmjax import hub, inference_spec, paths, pretrained, runs
from mmjax.convert import (
    albef,
    beit,
    bert,
    big_vision,
    blip,
    blip2,
    blip2_lavis,
    blip2_t5,
    blip_official,
    clip,
    decoder_lm,
    dvae,
    engine,
    io,
    library_configs,
    mae,
    minigpt4,
    qwen,
    siglip,
    t5,
    vilt,
    vit,
)
from mmjax.convert.export import Export, as_export

SOURCES = ("timm", "open_clip", "hf", "dall_e", "albef", "lavis", "blip", "minigpt4", "big_vision")
# several files -> one state dict; the LM folder's key prefix (lavis: by its model_type, opt_model. / t5_model.)
MERGED_SOURCES = {"lavis": blip2_lavis.lm_prefix, "minigpt4": minigpt4.LM_PREFIX}
HF_ARCHITECTURES = {"ViTModel": vit.from_hf, "ViTForImageClassification": vit.from_hf, "CLIPModel": clip.from_hf,
                    **dict.fromkeys(vit.HF_DINOV2_ARCHITECTURES, vit.from_hf_dinov2),
                    **dict.fromkeys(siglip.HF_ARCHITECTURES, siglip.from_hf),
                    "ViTMAEForPreTraining": mae.from_hf, "BeitForMaskedImageModeling": beit.from_hf,
                    "BeitForImageClassification": beit.from_hf, "FlavaImageCodebook": dvae.from_hf,
                    **dict.fromkeys(bert.HF_ARCHITECTURES, bert.from_hf),
                    **dict.fromkeys(vilt.HF_ARCHITECTURES, vilt.from_hf),
                    **dict.fromkeys(blip.HF_ARCHITECTURES, blip.from_hf),
                    **dict.fromkeys(blip2.HF_ARCHITECTURES + blip2.LM_ARCHITECTURES, blip2.from_hf),
                    **dict.fromkeys(decoder_lm.HF_ARCHITECTURES, decoder_lm.from_hf), qwen.ARCHITECTURE: qwen.from_hf,
                    **dict.fromkeys(t5.HF_ARCHITECTURES, t5.from_hf)}
HF_MODEL_TYPES = {"vit": "ViTModel", "clip": "CLIPModel", "siglip": "SiglipModel", "vit_mae": "ViTMAEForPreTraining",
                  "flava_image_codebook": "FlavaImageCodebook", "bert": "BertModel",
                  "vilt": "ViltModel", "llama": "LlamaForCausalLM", "opt": "OPTForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "t5": "T5ForConditionalGeneration",
                  **{t: a for a, t in vit.HF_DINOV2_MODEL_TYPES.items()}}
# (mmjax model class, target library) -> function(model_config) -> (table, HF config.json or None) or an
# export.Export (when the target also stores fixed tensors or has no place for some parameters)
EXPORTS = {
    (vit.VIT, "timm"): siglip.vit_timm_export,    # a plain timm ViT, or a vit_*_siglip_* tower
    (vit.VIT, "hf"): vit.hf_export,
    (vit.VIT, "big_vision"): big_vision.npz_export,   # the vision_transformer (AugReg) .npz layout
    (clip.CLIP, "open_clip"): siglip.clip_open_clip_export,   # a CLIP, or a SigLIP's CustomTextCLIP
    (clip.CLIP, "hf"): siglip.clip_hf_export,     # CLIPModel, or SiglipModel for a SigLIP
    (beit.BEIT, "timm"): beit.timm_export,
    (beit.BEIT, "hf"): beit.hf_export,
    (mae.MAE, "hf"): mae.hf_export,
    (mae.MAE, "timm"): mae.timm_export,
    (dvae.ENCODER, "dall_e"): dvae.dall_e_export,
    (dvae.DECODER, "dall_e"): dvae.dall_e_export,
    (bert.BERT, "hf"): bert.hf_export,
    (vilt.VILT, "hf"): vilt.hf_export,
    (blip.RETRIEVAL, "hf"): blip.hf_export,
    (blip.CAPTIONER, "hf"): blip.hf_export,
    (blip.QUESTION_ANSWERING, "hf"): blip.hf_export,
    (albef.ALBEF, "albef"): albef.official_export,
    **{(cls, "blip"): blip_official.official_export for cls in blip_official.TABLES},
    **{(cls, "hf"): blip2.hf_export for cls in blip2.CLASSES.values()},
    (blip2_t5.T5_CLASS, "hf"): blip2_t5.hf_export,
    (decoder_lm.DECODER_LM, "hf"): decoder_lm.hf_export,
    (t5.T5_CLASS, "hf"): t5.hf_export,
}


def _sidecar_timm_args(checkpoint: str) -> dict | None:
    """The timm.create_model arguments recorded beside a checkpoint: NAME.json (as `--to timm`
    writes, {"architecture", "model_args"}) or config.json (timm's Hugging Face Hub layout, with
    a top-level "global_pool"); None when neither is there."""
    for path in (library_configs.sidecar_path(checkpoint), paths.join(paths.dirname(checkpoint), "config.json")):
        if path != checkpoint and paths.isfile(path):
            config = _read_json(path)
            if not isinstance(config, dict):
                raise engine.ConversionError(f"{path}: expected a JSON object (a timm model config)")
            args = dict(config.get("model_args") or {})
            if "global_pool" in config:
                args.setdefault("global_pool", config["global_pool"])
            return args
    return None


def _resolve_hub_names(source: str, files: list, model: str | None) -> tuple[list, str | None]:
    """Hugging Face Hub names among the checkpoints as local files (mmjax.hub: the repository's weights
    file in `source`'s Hub layout, or its folder); a lone repository also names the model when
    `model` is None (timm's config.json, open_clip's open_clip_config.json)."""
    resolved = []
    for spec in files:
        if not hub.is_hub_name(str(spec)):
            resolved.append(spec)
            continue
        folder = hub.snapshot(str(spec))
        resolved.append(hub.weights_file(folder, source, str(spec)))
        if model is None and len(files) == 1:
            model = hub.model_name(folder, source)
    return resolved, model


def plan_import(source: str, checkpoint: str | Sequence[str], model: str | None = None,
                timm_model_args: dict | None = None) -> tuple[engine.Plan, dict]:
    """(plan, state dict) for a source checkpoint; the model name is checked before the file is read.
    lavis and minigpt4 take several files (see blip2_lavis.assemble), every other source one.

    timm ViTs: `timm_model_args` are the timm.create_model arguments the checkpoint was made with
    (its pooling: global_pool, fc_norm, class_token); None reads them from a timm config beside
    the checkpoint (see `_sidecar_timm_args`), else the name's default pooling."""
    if timm_model_args is not None and source != "timm":
        raise engine.ConversionError("timm model arguments apply to --source timm only")
    if source not in SOURCES:
        raise engine.ConversionError(f"Unknown source {source!r}; known: {SOURCES}")
    files = [checkpoint] if isinstance(checkpoint, str) else list(checkpoint)
    files, model = _resolve_hub_names(source, files, model)
    if source in MERGED_SOURCES:
        state, notes, lm_config = blip2_lavis.assemble(files, MERGED_SOURCES[source])
        if source == "lavis":
            plan = blip2_lavis.from_lavis(state, lm_num_heads=(lm_config or {}).get("num_attention_heads"),
                                          lm_config=lm_config)
        else:
            plan = minigpt4.from_official(state, lm_config=lm_config)
        plan.notes[:0] = notes
        return plan, state
    if len(files) != 1:
        raise engine.ConversionError(f"--source {source} takes one checkpoint, got {len(files)}: {files}")
    checkpoint = files[0]
    if source == "hf":
        config, state = io.read_hf_folder(checkpoint)
        arch = (config.get("architectures") or [HF_MODEL_TYPES.get(config.get("model_type"), "")])[0]
        if arch not in HF_ARCHITECTURES:
            raise engine.ConversionError(f"Unsupported Hugging Face architecture {arch or config.get('model_type')!r} "
                                         f"in {checkpoint}/config.json; supported: {sorted(HF_ARCHITECTURES)}")
        return HF_ARCHITECTURES[arch](config, state), state
    if source == "albef":   # an official ALBEF checkpoint: the architecture is read from its shapes
        state = io.read_state_dict(checkpoint)
        return albef.from_official(state), state
    if source == "blip":    # an official salesforce/BLIP checkpoint: the model and its sizes are read from its keys
        state = io.read_state_dict(checkpoint)
        return blip_official.from_official(state), state
    if source == "big_vision":   # JAX .npz: the architecture is read from its shapes; `model` only checks it
        state = big_vision.unroll_scanned(io.read_state_dict(checkpoint))
        return big_vision.from_npz(state, model), state
    if not model:
        raise engine.ConversionError(f"--model is required for --source {source}")
    if source == "timm" and siglip.is_timm_name(model):
        siglip.timm_architecture(model)
        args = timm_model_args if timm_model_args is not None else _sidecar_timm_args(checkpoint)
        state = io.read_state_dict(checkpoint)
        return siglip.from_timm(model, state, args), state
    if source == "timm":
        family = beit if model.startswith("beit") else vit
        family.timm_architecture(model)
        if family is beit:
            if timm_model_args is not None:
                raise engine.ConversionError("timm model arguments apply to timm ViTs only, not BEiT")
            state = io.read_state_dict(checkpoint)
            return beit.from_timm(model, state), state
        args = timm_model_args if timm_model_args is not None else _sidecar_timm_args(checkpoint)
        state = io.read_state_dict(checkpoint)
        return vit.from_timm(model, state, args), state
    if source == "dall_e":
        dvae.dall_e_model(model)
        state = io.read_state_dict(checkpoint)
        return dvae.from_dall_e(model, state), state
    family = siglip if siglip.is_open_clip(clip.open_clip_config(model)) else clip   # ViT-*-SigLIP*: timm towers
    state = io.read_state_dict(checkpoint)
    return family.from_open_clip(model, state), state


def import_checkpoint(source: str, checkpoint: str | Sequence[str], output: str, model: str | None = None, *,
                      scan: bool = False, overwrite: bool = False,
                      timm_model_args: dict | None = None) -> engine.Plan:
    """Converts a PyTorch (or big_vision .npz) checkpoint into an mmjax model directory (see mmjax.pretrained);
    `timm_model_args`: see plan_import."""
    plan, state = plan_import(source, checkpoint, model, timm_model_args)
    module = pretrained.build(plan.model_class, plan.fields)
    expected = pretrained.abstract_params(module, plan.inputs)
    flat = engine.to_mmjax(state, plan.table, expected, what=f"{source} checkpoint {checkpoint}")
    del state
    if scan:
        fields = pretrained.with_overrides(type(module), plan.fields, {"scan": True})
        module = pretrained.build(plan.model_class, fields)
        flat = engine.stack_layers(flat)
    described = {"class": plan.model_class, "fields": plan.fields, "inputs": plan.inputs, "source": plan.source}
    folder = checkpoint if isinstance(checkpoint, str) else checkpoint[0]
    folder = hub.snapshot(folder) if hub.is_hub_name(str(folder)) else folder
    processor = paths.join(folder, "preprocessor_config.json") if source == "hf" else ""
    processed = _read_json(processor) if processor and paths.isfile(processor) else None
    inference = inference_spec.for_source(described, processed)
    pretrained.save(output, module, engine.unflatten(flat), plan.inputs, plan.source, overwrite=overwrite,
                    inference=inference)
    return plan


def _read_json(path: str) -> dict:
    with paths.open(path) as f:
        return json.load(f)


def save_run(workdir: str, output: str, step: int | None = None, which: str = "params", *,
             scan: bool | None = None, overwrite: bool = False) -> dict:
    """Writes a training run's model (newest good checkpoint, or `step`) as a model directory,
    with its inference keys; returns the written model_config.json."""
    step = runs.resolve_step(workdir, step)
    config = runs.read_model_config(workdir)
    model, flat = pretrained.load_arrays(workdir, step=step, which=which, **({} if scan is None else {"scan": scan}))
    source = {"library": "mmjax", "run": paths.absolute(workdir), "step": step, "which": which,
              "task": config["source"].get("task")}
    inference = {k: config.get(k) for k in inference_spec.KEYS}
    pretrained.save(output, model, engine.unflatten(flat), config["inputs"], source, overwrite=overwrite,
                    inference=inference)
    return pretrained.read_config(output)


def plan_export(target: str, path: str) -> Export:
    """How a model directory or run becomes a `target` checkpoint (with notes for the user);
    raises when the target cannot express the model. Reads no parameters."""
    config = pretrained.model_config(path)
    exporter = EXPORTS.get((config["class"], target))
    if exporter is None:
        known = sorted(t for c, t in EXPORTS if c == config["class"])
        raise engine.ConversionError(f"Cannot write {config['class']} as {target!r}; targets for it: {known}")
    return as_export(exporter(config))


def export_checkpoint(target: str, path: str, output: str, step: int | None = None,
                      which: str = "params") -> dict[str, np.ndarray]:
    """Writes a model directory or run as a `target` state dict file (for hf: a model folder);
    open_clip and plain timm ViTs also get the config that builds the model (library_configs)."""
    spec = plan_export(target, path)
    if target == "big_vision" and not output.endswith(".npz"):
        raise engine.ConversionError(f"--to big_vision writes a JAX .npz file; got --output {output!r}")
    config = pretrained.model_config(path)
    unscanned = {"scan": False} if "scan" in config["fields"] else {}   # dVAE: no stack
    _, params = pretrained.load_arrays(path, step=step, which=which, **unscanned)
    state = spec.state_dict(params, what=f"{target} state dict")
    if target == "hf":
        io.write_hf_folder(output, _with_inference(spec.hf_config, config), state)
        return state
    io.write_state_dict(output, state)
    sidecar = (siglip.open_clip_config(config) if target == "open_clip"
               else siglip.timm_config(config) if target == "timm" else None)
    if sidecar is not None:
        with paths.open(library_configs.sidecar_path(output), "w") as f:
            json.dump(sidecar, f, indent=2)
    return state


def _with_inference(hf_config: dict, config: dict) -> dict:
    """The transformers config with what the model directory knows: class names as id2label, and
    CLIP's end-of-text id from its tokenizer (transformers pools text there)."""
    hf_config = json.loads(json.dumps(hf_config))
    known = inference_spec.spec(config, timm_lookup=False)   # no transform needed: no timm import
    names = known["class_names"]
    if names and "id2label" in hf_config and len(hf_config["id2label"]) == len(names):
        hf_config["id2label"] = {str(i): n for i, n in enumerate(names)}
        hf_config["label2id"] = {n: i for i, n in enumerate(names)}
    if known["tokenizer"] and "text_config" in hf_config and config["source"].get("library") != "hf":
        from mmjax.data import tokenizers
        # Only a tokenizer whose ids fit the model (a run's own) says where text ends; a recorded
        # default (OpenAI's BPE on a CLIP with another vocabulary) keeps the largest id, as mmjax pools.
        tokenizer, text = tokenizers.build_tokenizer(known["tokenizer"]), hf_config["text_config"]
        if tokenizer.eot_token_id < text["vocab_size"]:
            text["eos_token_id"] = int(tokenizer.eot_token_id)
            sot = getattr(tokenizer, "sot_token_id", None)
            if sot is not None and sot < text["vocab_size"]:
                text["bos_token_id"] = int(sot)
    return hf_config
