"""mmjax-convert: PyTorch checkpoints (timm, open_clip / OpenAI, Hugging Face, DALL-E dVAE) <-> mmjax.

    mmjax-convert --source timm --model vit_base_patch16_224 --checkpoint model.safetensors --output DIR
    mmjax-convert --source open_clip --model ViT-B-16 --checkpoint open_clip_model.safetensors --output DIR
    mmjax-convert --source hf --checkpoint HF_MODEL_FOLDER --output DIR
    mmjax-convert --source dall_e --model encoder --checkpoint dall_e_encoder.pt --output DIR
    mmjax-convert --to timm --input DIR --output model.safetensors
    mmjax-convert --to hf --input DIR --output HF_MODEL_FOLDER     (ViT, CLIP, MAE, BEiT)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

EXPORT_TARGETS = ("timm", "open_clip", "hf", "dall_e")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmjax-convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    direction = p.add_mutually_exclusive_group(required=True)
    direction.add_argument("--source", choices=("timm", "open_clip", "hf", "dall_e"),
                           help="convert a PyTorch checkpoint of this library into an mmjax model directory")
    direction.add_argument("--to", choices=EXPORT_TARGETS,
                           help="convert an mmjax model directory into a state dict of this library")
    p.add_argument("--model", help="timm / open_clip model name (or an open_clip config .json), "
                                   "dall_e: encoder or decoder; "
                                   "not needed for hf, whose config.json names the architecture")
    p.add_argument("--checkpoint", help="state dict file (.safetensors, .bin, .pth), or a transformers folder")
    p.add_argument("--input", help="mmjax model directory (with --to)")
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
    if args.to and not args.input:
        parser.error("--to needs --input")
    from mmjax.convert import api  # after argument checks: importing jax takes a moment
    try:
        if args.source:
            plan = api.import_checkpoint(args.source, args.checkpoint, args.output, args.model,
                                         scan=args.scan, overwrite=args.overwrite)
            for note in plan.notes:
                print(f"note: {note}")
            print(f"Wrote {plan.model_class.rsplit('.', 1)[-1]} from {args.source} {args.model or args.checkpoint} "
                  f"to {args.output}; load it with mmjax.load({args.output!r})")
        else:
            state = api.export_checkpoint(args.to, args.input, args.output)
            for note in api.plan_export(args.to, args.input).notes:
                print(f"note: {note}")
            print(f"Wrote {len(state)} tensors for {args.to} to {args.output}")
    except (ValueError, OSError) as e:      # ConversionError is a ValueError
        print(f"mmjax-convert: error: {e}", file=sys.stderr)
        raise SystemExit(1) from e


if __name__ == "__main__":
    main()
