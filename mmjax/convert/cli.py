"""mmjax-convert: PyTorch checkpoints (timm, open_clip / OpenAI, Hugging Face, DALL-E dVAE) <-> mmjax.

    mmjax-convert --source timm --model vit_base_patch16_224 --checkpoint model.safetensors --output DIR
        [--model-args '{"global_pool": "avg"}']   (the pooling it was made with; default: timm's config beside it)
    mmjax-convert --source open_clip --model ViT-B-16 --checkpoint open_clip_model.safetensors --output DIR
    mmjax-convert --source hf --checkpoint HF_MODEL_FOLDER --output DIR
    mmjax-convert --source big_vision --checkpoint ViT-B_16.npz --output DIR    (big_vision / AugReg .npz;
        the shapes give the architecture, an optional --model vit_base_patch16_224 or B/16 is checked)
    mmjax-convert --source dall_e --model encoder --checkpoint dall_e_encoder.pt --output DIR
    mmjax-convert --source minigpt4 --checkpoint eva_vit_g.pth --checkpoint blip2_pretrained_flant5xxl.pth \
        --checkpoint VICUNA_FOLDER --checkpoint pretrained_minigpt4.pth --output DIR
    mmjax-convert --source lavis --checkpoint eva_vit_g.pth --checkpoint blip2_pretrained_flant5xl.pth \
        --checkpoint FLAN_T5_XL_FOLDER --output DIR        (LAVIS blip2_t5; blip2_opt with an OPT folder)
    mmjax-convert --to timm --input DIR --output model.safetensors
    mmjax-convert --to hf --input DIR --output HF_MODEL_FOLDER     (ViT, CLIP, MAE, BEiT)
    mmjax-convert --to big_vision --input DIR --output model.npz    (a ViT, in the AugReg .npz layout)

A training workdir (mmjax-train --workdir) works as --input too: its newest good checkpoint, or
--step N; without --to it becomes a model directory:
    mmjax-convert --input runs/clip --output clip_model_dir
    mmjax-convert --to open_clip --input runs/clip [--step 1500] --output clip.safetensors   (+ clip.json)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

EXPORT_TARGETS = ("timm", "open_clip", "hf", "dall_e", "albef", "blip", "big_vision")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmjax-convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    direction = p.add_mutually_exclusive_group()
    direction.add_argument("--source", choices=("timm", "open_clip", "hf", "dall_e", "albef", "lavis", "blip",
                                                "minigpt4", "big_vision"),
                           help="convert a PyTorch checkpoint of this library into an mmjax model directory")
    direction.add_argument("--to", choices=EXPORT_TARGETS,
                           help="convert an mmjax model directory or training workdir into a state dict of "
                                "this library (open_clip and timm ViTs: plus OUTPUT's stem .json, the config "
                                "that builds the model)")
    p.add_argument("--model", help="timm / open_clip model name (or an open_clip config .json), "
                                   "dall_e: encoder or decoder; big_vision: optional, checked against the shapes; "
                                   "not needed for hf, whose config.json names the architecture")
    p.add_argument("--model-args", metavar="JSON",
                   help="timm ViTs: the timm.create_model arguments the checkpoint was made with, as a JSON "
                        "object; its pooling is read (global_pool, fc_norm, class_token), e.g. "
                        "'{\"global_pool\": \"avg\", \"fc_norm\": false}'. Default: from NAME.json or "
                        "config.json beside the checkpoint (timm's Hub layout), else the name's global_pool='token'")
    p.add_argument("--checkpoint", action="append",
                   help="state dict file (.safetensors, .bin, .pth; big_vision: .npz), or a transformers folder; "
                        "lavis and minigpt4 take several, merged (their released files hold the trained parameters "
                        "only): e.g. eva_vit_g.pth, the BLIP-2 file, the LM's transformers folder, the MiniGPT-4 file")
    p.add_argument("--input", help="mmjax model directory or training workdir (with --to); a workdir "
                                   "alone becomes a model directory")
    p.add_argument("--step", type=int, help="with a workdir: this checkpoint step (default: the newest good one)")
    p.add_argument("--which", choices=("params", "ema"), default="params",
                   help="with a workdir: the trained parameters, or the EMA ones a task keeps")
    p.add_argument("--output", required=True,
                   help="mmjax model directory (with --source); state dict file or, for hf, a folder (with --to)")
    p.add_argument("--scan", action="store_true", help="store layers stacked for nn.scan")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model directory")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.source and not args.checkpoint:
        parser.error("--source needs --checkpoint")
    if not (args.source or args.to or args.input):
        parser.error("one of --source, --to, or --input (a training workdir) is required")
    if args.to and not args.input:
        parser.error("--to needs --input")
    if (args.step is not None or args.which != "params") and not args.input:
        parser.error("--step and --which apply to --input")
    model_args = None
    if args.model_args is not None:
        if args.source != "timm":
            parser.error("--model-args applies to --source timm")
        try:
            model_args = json.loads(args.model_args)
        except json.JSONDecodeError as e:
            parser.error(f"--model-args is not JSON: {e}")
        if not isinstance(model_args, dict):
            parser.error("--model-args must be a JSON object, e.g. '{\"global_pool\": \"avg\"}'")
    from mmjax.convert import api  # after argument checks: importing jax takes a moment
    try:
        if args.source:
            plan = api.import_checkpoint(args.source, args.checkpoint, args.output, args.model,
                                         scan=args.scan, overwrite=args.overwrite, timm_model_args=model_args)
            for note in plan.notes:
                print(f"note: {note}")
            print(f"Wrote {plan.model_class.rsplit('.', 1)[-1]} from {args.source} "
                  f"{args.model or ', '.join(args.checkpoint)} "
                  f"to {args.output}; load it with mmjax.load({args.output!r})")
        elif not args.to:
            from mmjax import runs
            if not runs.is_run(args.input):
                parser.error(f"--input {args.input} is not a training workdir; to export a model directory "
                             "name a target with --to")
            config = api.save_run(args.input, args.output, args.step, args.which,
                                  scan=True if args.scan else None, overwrite=args.overwrite)
            print(f"Wrote {config['class'].rsplit('.', 1)[-1]} of run {args.input} (step {config['source']['step']}, "
                  f"{args.which}) to {args.output}; load it with mmjax.load({args.output!r})")
        else:
            state = api.export_checkpoint(args.to, args.input, args.output, args.step, args.which)
            for note in api.plan_export(args.to, args.input).notes:
                print(f"note: {note}")
            print(f"Wrote {len(state)} tensors for {args.to} to {args.output}")
            from mmjax import pretrained
            from mmjax.convert import library_configs
            if args.to == "open_clip" or (args.to == "timm" and library_configs.timm_vit_config(
                    pretrained.model_config(args.input)) is not None):
                print(f"and the {args.to} model config to {library_configs.sidecar_path(args.output)} "
                      "(how to use it: mmjax/convert/library_configs.py)")
    except (ValueError, OSError) as e:      # ConversionError is a ValueError
        print(f"mmjax-convert: error: {e}", file=sys.stderr)
        raise SystemExit(1) from e


if __name__ == "__main__":
    main()
