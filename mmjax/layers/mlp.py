"""The feed-forward block: Dense → activation → Dense, or a gated variant (GLU family).

`act` names an activation of `common.activation` ("gelu" is exact, erf form; "gelu_tanh",
"quick_gelu", "relu", "silu") or a gated kind: "swiglu" (SiLU gate, LLaMA), "geglu" (tanh-GELU
gate, T5 v1.1's gated-gelu) and "geglu_exact" (exact-GELU gate: the Flan-T5 of BLIP-2's checkpoints,
whose configs set dense_act_fn "gelu"). Gated kinds compute fc2(act(gate(x)) · fc1(x)); parameters: `gate`
(the activated projection: LLaMA's gate_proj, T5's wi_0), `fc1` (up_proj / wi_1), `fc2`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers.common import Dtype, activation, constrain, dense_init

GATED = {"swiglu": "silu", "geglu": "gelu_tanh", "geglu_exact": "gelu"}


def check_kind(act: str) -> None:
    """Raises for an unknown MLP kind (activation or gated kind)."""
    if act not in GATED:
        activation(act)


class Mlp(nn.Module):
    """Two-layer feed-forward block (see the module docstring for the kinds)."""

    mlp_dim: int
    out_dim: int | None = None
    act: str = "gelu"
    dropout: float = 0.0
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        check_kind(self.act)
        width = self.out_dim or x.shape[-1]

        def dense(features: int, names: tuple[str, str], name: str) -> nn.Dense:
            return nn.Dense(features, use_bias=self.use_bias, dtype=self.dtype, name=name,
                            kernel_init=dense_init(names),
                            bias_init=dense_init(names[1:], nn.initializers.normal(1e-6)))

        hidden = dense(self.mlp_dim, ("embed", "mlp"), "fc1")(x)
        if self.act in GATED:
            gate = dense(self.mlp_dim, ("embed", "mlp"), "gate")(x)
            hidden = activation(GATED[self.act])(gate) * hidden
        else:
            hidden = activation(self.act)(hidden)
        hidden = constrain(hidden, ("act_batch", "act_len", "act_mlp"))
        hidden = nn.Dropout(self.dropout)(hidden, deterministic=deterministic)
        out = dense(width, ("mlp", "embed"), "fc2")(hidden)
        return constrain(out, ("act_batch", "act_len", "act_emb"))
