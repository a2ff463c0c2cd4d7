"""The PyTorch references, built offline with random weights: timm's ViT and open_clip's CLIP.

Same architecture, batch and input shapes as the mmjax workload; inference under
`torch.inference_mode`, a train step as forward, loss, backward and AdamW. On CUDA, compute runs
under bf16 autocast (parameters stay float32), matching mmjax's `dtype="bfloat16"`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from benchmarks import timing
from benchmarks.workloads import CLIP_EMBED, CLIP_TEXT, TINY, Workload


def build_model(w: Workload):
    import open_clip
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if w.family == "vit":
        if w.variant == "tiny":
            return VisionTransformer(img_size=w.image_size, patch_size=8, num_classes=10, embed_dim=TINY["width"],
                                     depth=TINY["depth"], num_heads=TINY["num_heads"],
                                     mlp_ratio=TINY["mlp_dim"] / TINY["width"])
        name = {"Ti/16": "vit_tiny_patch16_224", "S/16": "vit_small_patch16_224", "B/16": "vit_base_patch16_224",
                "L/16": "vit_large_patch16_224"}[w.variant]
        return timm.create_model(name, pretrained=False, img_size=w.image_size)
    if w.variant == "tiny":
        vision = {"layers": TINY["depth"], "width": TINY["width"], "head_width": TINY["width"] // TINY["num_heads"],
                      "mlp_ratio": TINY["mlp_dim"] / TINY["width"], "patch_size": 8, "image_size": w.image_size}
        text = {"context_length": w.text_length, "vocab_size": 256, "width": TINY["width"], "heads": TINY["num_heads"],
                    "layers": TINY["depth"], "mlp_ratio": TINY["mlp_dim"] / TINY["width"]}
        return open_clip.CLIP(32, vision, text)
    if (w.image_size, w.text_length) == (224, 77) and w.variant in ("B/16", "L/14"):
        return open_clip.create_model("ViT-" + w.variant.replace("/", "-"), pretrained=None)
    size, patch = w.variant.split("/")
    vision = {"B": {"layers": 12, "width": 768}, "L": {"layers": 24, "width": 1024}}[size]
    vision = dict(vision, head_width=64, patch_size=int(patch), image_size=w.image_size)
    t = CLIP_TEXT[size]
    text = {"context_length": w.text_length, "vocab_size": t["vocab_size"], "width": t["width"],
            "heads": t["num_heads"], "layers": t["depth"]}
    return open_clip.CLIP(CLIP_EMBED[size], vision, text)


def benchmark(w: Workload, warmup: int, steps: int, device: str = "cpu", threads: int | None = None) -> dict[str, Any]:
    """Inference and train-step timings of the reference model for workload `w`."""
    import torch
    import torch.nn.functional as F
    from open_clip.loss import ClipLoss

    if threads:
        torch.set_num_threads(threads)
    model = build_model(w).to(device)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.normal(size=(w.batch, 3, w.image_size, w.image_size)).astype(np.float32)).to(device)
    if w.family == "vit":
        target = torch.from_numpy(rng.integers(0, 10, size=(w.batch,))).to(device)
        def loss_fn():
            return F.cross_entropy(model(images), target)
        def infer():
            return model(images)
    else:
        vocab = 256 if w.variant == "tiny" else CLIP_TEXT["B"]["vocab_size"]
        tokens = torch.from_numpy(rng.integers(1, vocab, size=(w.batch, w.text_length))).to(device)
        clip_loss = ClipLoss()
        def loss_fn():
            zi, zt, scale = model(images, tokens)
            return clip_loss(zi, zt, scale)
        def infer():
            return model(images, tokens)

    cuda = device.startswith("cuda")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if w.dtype == "bfloat16" and cuda \
        else contextlib.nullcontext
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, **({"fused": True} if cuda else {}))

    def train_step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn()
        loss.backward()
        opt.step()

    def inference_step():
        with torch.inference_mode(), autocast():
            infer()

    model.eval()
    out = {"inference": timing.time_callable(inference_step, warmup, steps, w.batch, sync)}
    model.train()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out["train"] = timing.time_callable(train_step, warmup, steps, w.batch, sync)
    if cuda:
        out["train"]["device_peak_bytes"] = torch.cuda.max_memory_allocated()
    out["threads"] = torch.get_num_threads()
    out["model"] = type(model).__name__
    return out
