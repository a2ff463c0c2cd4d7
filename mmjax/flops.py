"""Analytic FLOP counts: the shared arithmetic, peak accelerator throughput and MFU.

Counts are matmul FLOPs (2 per multiply-add), MaxText-style: projections, attention scores and
the attention-weighted sum, MLPs, convolutions (patch embedding), heads. Norms, softmax and
activations are left out (a few % of the total); so are embedding look-ups. Attention is counted
in full, also when causal, because the "xla" backend computes the full score matrix.

Each model family counts itself next to its architecture (`forward_flops` in
mmjax/models/<family>.py) from the pieces here, and each task turns that into the
`train_flops_per_example` the trainer logs as TFLOP/s and MFU. Training costs 3× the forward
pass (forward, plus two matmuls per matmul in the backward pass). That is the *model* FLOP count
that MFU uses; rematerialisation adds recomputed forward work on top (`remat_recompute_flops`),
which is hardware work but not model progress.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

TRAIN_FACTOR = 3.0   # forward + backward (grad w.r.t. activations and w.r.t. weights)

# Dense bf16 peak, TFLOP/s per chip, matched as substrings of `jax.Device.device_kind`, most
# specific first. TPU v5e reports "TPU v5 lite", v6e (Trillium) "TPU v6 lite", v5p "TPU v5".
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("TPU v6 lite", 918.0), ("TPU v6e", 918.0),
    ("TPU v5 lite", 197.0), ("TPU v5e", 197.0),
    ("TPU v5p", 459.0), ("TPU v5", 459.0),
    ("TPU v4", 275.0),
    ("H100 PCIe", 756.0),   # the PCIe card has fewer SMs and a lower clock than SXM
    ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
    ("A100", 312.0),
)


def peak_tflops(device_kind: str) -> float | None:
    """Peak dense bf16 TFLOP/s of one device of this kind, or None when unknown (e.g. CPUs)."""
    for key, peak in PEAK_BF16_TFLOPS:
        if key.lower() in device_kind.lower():
            return peak
    return None


def mfu(flops_per_sec_per_device: float, device_kind: str) -> float | None:
    """Model FLOP utilisation: achieved model FLOP/s per device ÷ the device's bf16 peak."""
    peak = peak_tflops(device_kind)
    return None if peak is None else flops_per_sec_per_device / (peak * 1e12)


def throughput(train_flops_per_example: float, examples_per_sec: float, num_devices: int,
               device_kind: str) -> dict[str, float]:
    """What the trainer logs: model TFLOP/s per device, and MFU where the peak is known."""
    per_device = train_flops_per_example * examples_per_sec / num_devices
    out = {"tflops_per_device": per_device / 1e12}
    utilisation = mfu(per_device, device_kind)
    if utilisation is not None:
        out["mfu"] = utilisation
    return out


def dense(tokens: float, d_in: int, d_out: int) -> float:
    """A (tokens, d_in) × (d_in, d_out) matmul."""
    return 2.0 * tokens * d_in * d_out


def attention(queries: float, keys: float, width: int) -> float:
    """Scores q·kᵀ and the weighted sum of values, over all heads (width = heads × head_dim)."""
    return 4.0 * queries * keys * width


def _taps(size: int, kernel: int, stride: int, padding: str) -> tuple[int, int]:
    """(output size, kernel taps that land inside the input, summed over output positions) along
    one axis; taps on SAME padding multiply zeros and are not counted, as XLA does not."""
    if padding == "VALID":
        out = (size - kernel) // stride + 1
        return out, out * kernel
    out = -(-size // stride)
    low = max((out - 1) * stride + kernel - size, 0) // 2
    starts = (o * stride - low for o in range(out))
    return out, sum(min(kernel, size - start) - max(0, -start) for start in starts)


def conv(in_hw: Sequence[int], kernel_hw: Sequence[int], c_in: int, c_out: int, stride: int | Sequence[int] = 1,
         padding: str = "SAME") -> float:
    """A 2-D convolution of an (h, w, c_in) map: 2 per multiply-add of a kernel tap inside the
    input. A patch embedding is one with kernel = stride = patch and "VALID" padding."""
    if padding not in ("SAME", "VALID"):
        raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}")
    strides = (stride, stride) if isinstance(stride, int) else tuple(stride)
    (_, taps_h), (_, taps_w) = (_taps(n, k, st, padding) for n, k, st in zip(in_hw, kernel_hw, strides))
    return 2.0 * taps_h * taps_w * c_in * c_out


def patch_embed(image_hw: Sequence[int], patch: Sequence[int], c_in: int, width: int) -> float:
    """The patchify convolution (kernel = stride = patch)."""
    return conv(image_hw, patch, c_in, width, stride=tuple(patch), padding="VALID")


def transformer_blocks(tokens: int, width: int, depth: int, mlp_dim: int, name: str = "blocks") -> dict[str, float]:
    """Forward FLOPs of `depth` transformer blocks on one sequence of `tokens` tokens, as two
    parts: "{name}_linear" grows with the token count (q/k/v/out projections and the MLP),
    "{name}_attention" is the quadratic part (scores q·kᵀ and the weighted sum of values).
    `name` must contain "blocks" for `remat_recompute_flops` to find the parts."""
    linear = 4 * dense(tokens, width, width) + 2 * dense(tokens, width, mlp_dim)
    return {f"{name}_linear": depth * linear, f"{name}_attention": depth * attention(tokens, tokens, width)}


def prefixed(prefix: str, parts: Mapping[str, float]) -> dict[str, float]:
    """`parts` with every name prefixed (a tower's count inside a larger model's)."""
    return {f"{prefix}{k}": v for k, v in parts.items()}


def remat_recompute_flops(forward: Mapping[str, float], policy: str) -> float:
    """Extra forward FLOPs that rematerialisation recomputes in the backward pass.

    "full" recomputes every block; "dots_no_batch" saves weight matmuls but recomputes the
    attention matmuls (which have a batch dimension); "dots" and "none" recompute no matmuls.
    """
    blocks = sum(v for k, v in forward.items() if "blocks_" in k)
    quadratic = sum(v for k, v in forward.items() if "blocks_attention" in k)
    return {"none": 0.0, "dots": 0.0, "dots_no_batch": quadratic, "full": blocks}[policy]


def total(parts: Mapping[str, float]) -> float:
    """The sum of a count's parts."""
    return float(sum(parts.values()))
