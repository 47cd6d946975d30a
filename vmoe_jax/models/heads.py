"""Pooling heads that turn the encoder's tokens into pre-logits.

Axis letters: B images, T tokens per image, D width, H the head's MLP width.

`MapHead`: multi-head attention pooling, (B, T, D) -> (B, D). A learned probe
(1, 1, D) is the single query of a multi-head attention over all T tokens
(Lee et al. 2019, "Set Transformer", PMA; Zhai et al. 2022, "Scaling Vision
Transformers", the MAP head), followed by a residual MLP on its LayerNorm:

  y = MHA(query=probe, keys=values=x)            (B, 1, D)
  out = y + MLP(LayerNorm(y))                    (B, 1, D) -> (B, D)

There is no position inside the head, so the output does not depend on the
order of the tokens. Parameter names (below `map_head/` in the ViT):
probe (1, 1, D); attention/{query,key,value}/{kernel (D, h, D/h), bias (h, D/h)};
attention/out/{kernel (h, D/h, D), bias (D,)}; norm/{scale, bias} (D,);
mlp/Dense_0/{kernel (D, H), bias (H,)}; mlp/Dense_1/{kernel (H, D), bias (D,)}.
They match big_vision's MAPHead one to one (`vmoe_jax.transfer.npz_loader.from_big_vision`
converts its names).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class _Mlp(nn.Module):
  """(B, 1, D) -> (B, 1, D): Dense (D, H), GELU, Dense (H, D)."""

  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = dict(
      kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.normal(stddev=1e-6)
    )
    y = nn.Dense(self.mlp_dim, dtype=self.dtype, name='Dense_0', **init)(x)
    y = nn.gelu(y)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name='Dense_1', **init)(y)


class MapHead(nn.Module):
  """Multi-head attention pooling: tokens (B, T, D) -> pre-logits (B, D) in `dtype`.

  Attributes:
    num_heads: attention heads; must divide D.
    mlp_dim: hidden width H of the MLP after the attention.
    dtype: compute dtype (parameters stay float32).
  """

  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, _, width = x.shape
    x = x.astype(self.dtype)
    probe = self.param('probe', nn.initializers.xavier_uniform(), (1, 1, width), jnp.float32)
    probe = jnp.broadcast_to(probe.astype(self.dtype), (batch, 1, width))
    y = nn.MultiHeadDotProductAttention(
      num_heads=self.num_heads,
      dtype=self.dtype,
      kernel_init=nn.initializers.xavier_uniform(),
      name='attention',
    )(probe, x)
    y = y + _Mlp(self.mlp_dim, self.dtype, name='mlp')(
      nn.LayerNorm(dtype=self.dtype, name='norm')(y)
    )
    return y[:, 0]
