"""Vision Transformer with optional sparse MoE MLPs (ViT, Switch-ViT, V-MoE).

Axis letters: B images, H x W pixels, T tokens per image, D width.

Size names like "S/16" ("variant/patch") are decoded in one place,
`decode_variant`; explicit width/depth/num_heads/mlp_dim override them.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from vmoe_jax.errors import UserError
from vmoe_jax.models import heads
from vmoe_jax.moe import layer as moe_layer
from vmoe_jax.moe.spec import AUX_LOSS_WEIGHTS
from vmoe_jax.moe.spec import MoeSpec

# Width, depth, heads, MLP width (Dosovitskiy et al. 2021; Ti and S from
# Touvron et al. 2021; "M" as in big_vision).
VARIANTS = {
  'Ti': dict(width=192, depth=12, num_heads=3, mlp_dim=768),
  'S': dict(width=384, depth=12, num_heads=6, mlp_dim=1536),
  'M': dict(width=512, depth=12, num_heads=8, mlp_dim=2048),
  'B': dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
  'L': dict(width=1024, depth=24, num_heads=16, mlp_dim=4096),
  'H': dict(width=1280, depth=32, num_heads=16, mlp_dim=5120),
}


def decode_variant(variant: str) -> dict[str, int]:
  """'S/16' -> dict(width=384, depth=12, num_heads=6, mlp_dim=1536, patch_size=16)."""
  match = re.fullmatch(r'([A-Za-z]+)/(\d+)', variant or '')
  if not match or match.group(1) not in VARIANTS:
    raise UserError(
      f'model variant {variant!r} is unknown; use NAME/PATCH with NAME in {list(VARIANTS)}, '
      "e.g. 'S/16'."
    )
  return dict(VARIANTS[match.group(1)], patch_size=int(match.group(2)))


STEMS = ('patch', 'conv')
# 'token': the class token; 'gap': the mean token; 'map': attention pooling (`heads.MapHead`).
CLASSIFIERS = ('token', 'gap', 'map')
# Compute dtypes of activations and matmuls (parameters stay float32).
DTYPES = ('float32', 'bfloat16', 'float16')


def conv_stem_channels(width: int, patch_size: int) -> tuple[int, ...]:
  """Channels of the 3x3 stride-2 convolutions of the conv stem for a patch size 2^n.

  Xiao et al. 2021 ("Early convolutions help transformers see better"): n
  convolutions whose channels double up to the model width (width / 2^(n-1),
  ..., width / 2, width), then a 1x1 convolution to the width.
  """
  n = patch_size.bit_length() - 1
  if patch_size < 2 or 2**n != patch_size:
    raise UserError(
      f"model.patch_size={patch_size} with model.stem='conv' must be a power of 2 (2, 4, 8, 16); "
      'change --config.model.patch_size or use --config.model.stem=patch.'
    )
  return tuple(max(1, width // 2 ** (n - 1 - i)) for i in range(n))


def stem_extra_convs_per_stage(extra_convs, num_stages: int) -> tuple[int, ...]:
  """The stride-1 convolutions after each stride-2 one: `extra_convs` as a tuple of `num_stages`.

  `extra_convs` is one count for every stage (an int, or a string such as
  '1'), or one per stage, first (highest resolution) to last: a tuple, or a
  comma-separated string such as '0,2'.
  """
  if isinstance(extra_convs, str):
    try:
      counts = tuple(int(c) for c in extra_convs.split(','))
    except ValueError:
      counts = ()
  elif isinstance(extra_convs, int):
    counts = (extra_convs,)
  else:
    counts = tuple(extra_convs)
  if len(counts) == 1:
    counts = counts * num_stages
  if len(counts) != num_stages or any(c < 0 for c in counts):
    raise UserError(
      f'model.stem_extra_convs={extra_convs!r} must be one count of stride-1 convolutions for '
      f'every stage (e.g. 1) or one per stride-2 convolution ({num_stages} here, e.g. '
      f'{",".join(["0"] * (num_stages - 1) + ["2"])!r}).'
    )
  return counts


def conv3x3_patches(x: jax.Array, stride: int) -> jax.Array:
  """(B, H, W, C) -> (B, ceil(H/s), ceil(W/s), 9C): the windows of a 3x3 'SAME' conv of stride s.

  Padded as `lax.conv` pads 'SAME' (an odd pixel goes to the bottom/right)
  and ordered (row, column, channel) like a (3, 3, C, O) kernel, so that
  `conv3x3_patches(x, s) @ kernel.reshape(9 * C, O)` is that convolution.
  """
  _, h, w, _ = x.shape
  out_h, out_w = -(-h // stride), -(-w // stride)
  pad_h = max((out_h - 1) * stride + 3 - h, 0)
  pad_w = max((out_w - 1) * stride + 3 - w, 0)
  x = jnp.pad(
    x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0))
  )
  last_h, last_w = (out_h - 1) * stride + 1, (out_w - 1) * stride + 1
  windows = [
    x[:, i : i + last_h : stride, j : j + last_w : stride, :] for i in range(3) for j in range(3)
  ]
  return jnp.concatenate(windows, axis=-1)


class Conv3x3(nn.Module):
  """A 3x3 'SAME' convolution computed as one matmul over `conv3x3_patches`.

  Its parameters are `nn.Conv`'s (kernel (3, 3, C, O), lecun-normal; bias
  zeros), and so is its output. On the 2-core CPU, a Fashion-MNIST train step
  with the two stride-2 convolutions in this form took 607-622 ms against
  663-675 ms with `nn.Conv` (interleaved, 8 steps each); with the stride-1
  convolutions of `extra_convs` as well, whole runs took the same time.
  """

  features: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    kernel = self.param(
      'kernel', nn.initializers.lecun_normal(), (3, 3, channels, self.features), jnp.float32
    )
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    patches = conv3x3_patches(x.astype(self.dtype), self.stride)
    kernel = kernel.reshape(9 * channels, self.features).astype(self.dtype)
    return patches @ kernel + bias.astype(self.dtype)


class ConvStem(nn.Module):
  """Convolutional stem: (B, H, W, C) -> (B, H/p, W/p, D), 3x3 stride-2 convs + a 1x1 conv.

  Each 3x3 convolution is followed by LayerNorm over channels and GELU (the
  paper uses BatchNorm and ReLU; LayerNorm keeps the model free of batch
  statistics, so that training and evaluation see the same function).
  `extra_convs` stride-1 3x3 convolutions (same channels, LayerNorm, GELU)
  follow each stride-2 one, as in a small CNN: more local feature
  extraction before the tokens are formed. One count for every stage, or
  one per stage (`stem_extra_convs_per_stage`): on a CPU a convolution at the
  last, coarsest stage costs far less time than one at the first, although
  they may have the same FLOPs.
  """

  width: int
  patch_size: int
  dtype: Any = jnp.float32
  extra_convs: int | str | tuple[int, ...] = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    stages = conv_stem_channels(self.width, self.patch_size)
    extra = stem_extra_convs_per_stage(self.extra_convs, len(stages))
    for i, channels in enumerate(stages):
      x = Conv3x3(channels, stride=2, dtype=self.dtype, name=f'conv_{i}')(x)
      x = nn.gelu(nn.LayerNorm(dtype=self.dtype, name=f'norm_{i}')(x))
      for k in range(extra[i]):
        x = Conv3x3(channels, stride=1, dtype=self.dtype, name=f'conv_{i}_{k + 1}')(x)
        x = nn.gelu(nn.LayerNorm(dtype=self.dtype, name=f'norm_{i}_{k + 1}')(x))
    return nn.Conv(self.width, (1, 1), dtype=self.dtype, name='projection')(x)


class MlpBlock(nn.Module):
  """Dense MLP: (B, T, D) -> (B, T, D)."""

  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    width = x.shape[-1]
    init = dict(
      kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.normal(stddev=1e-6)
    )
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, **init)(x)
    x = nn.gelu(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    return nn.Dense(width, dtype=self.dtype, **init)(x)


class EncoderBlock(nn.Module):
  """Pre-LayerNorm Transformer block; the MLP is an MoE when `moe` is set."""

  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  moe: MoeSpec | None = None  # Set for the blocks whose MLP is an MoE layer.
  mesh: Mesh | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, mask=None) -> tuple[jax.Array, dict | None]:
    y = nn.LayerNorm(dtype=self.dtype, name='norm_attention')(x)
    y = nn.MultiHeadDotProductAttention(
      num_heads=self.num_heads,
      dtype=self.dtype,
      kernel_init=nn.initializers.xavier_uniform(),
      dropout_rate=self.attention_dropout_rate,
      deterministic=not train,
      name='attention',
    )(y, y)
    x = x + nn.Dropout(self.dropout_rate)(y, deterministic=not train)
    y = nn.LayerNorm(dtype=self.dtype, name='norm_mlp')(x)
    metrics = None
    if self.moe is not None:
      y, metrics = moe_layer.MoeMlp(self.moe, dtype=self.dtype, mesh=self.mesh, name='moe')(
        y, train=train, mask=mask
      )
    else:
      y = MlpBlock(self.mlp_dim, self.dropout_rate, self.dtype, name='mlp')(y, train=train)
    x = x + nn.Dropout(self.dropout_rate)(y, deterministic=not train)
    return x, metrics


class ViT(nn.Module):
  """ViT classifier: images (B, H, W, C) -> logits (B, classes) float32, extras.

  `extras` holds 'pre_logits' (B, D), 'auxiliary_loss' (the weighted sum of
  every MoE layer's auxiliary losses, float32) and 'moe', a dict from block
  index to that layer's metrics.
  """

  num_classes: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  classifier: str = 'token'
  stem: str = 'patch'  # 'patch' (one strided convolution) or 'conv' (`ConvStem`).
  stem_extra_convs: int | str | tuple[int, ...] = 0  # `ConvStem.extra_convs`.
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  moe: MoeSpec | None = None  # The MoE layers (blocks moe.layers); None: dense.
  mesh: Mesh | None = None

  @property
  def moe_layers(self) -> tuple[int, ...]:
    return self.moe.layers if self.moe is not None else ()

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool, mask=None) -> tuple[jax.Array, dict]:
    """images (B, H, W, C), mask (B,) (0 for padding rows, evaluation) -> logits, extras."""
    if self.stem == 'conv':
      x = ConvStem(
        self.width, self.patch_size, self.dtype, extra_convs=self.stem_extra_convs, name='stem'
      )(images.astype(self.dtype))
    else:
      x = nn.Conv(
        self.width,
        (self.patch_size, self.patch_size),
        strides=(self.patch_size, self.patch_size),
        padding='VALID',
        dtype=self.dtype,
        name='embedding',
      )(images.astype(self.dtype))
    batch, rows, cols, width = x.shape
    x = x.reshape(batch, rows * cols, width)
    if self.classifier == 'token':
      cls = self.param('cls', nn.initializers.zeros, (1, 1, width))
      x = jnp.concatenate([jnp.tile(cls.astype(self.dtype), (batch, 1, 1)), x], axis=1)
    pos = self.param('pos_embedding', nn.initializers.normal(stddev=0.02), (1, *x.shape[1:]))
    x = x + pos.astype(self.dtype)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)

    moe_metrics = {}
    for i in range(self.depth):
      x, metrics = EncoderBlock(
        num_heads=self.num_heads,
        mlp_dim=self.mlp_dim,
        dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        dtype=self.dtype,
        moe=self.moe if i in self.moe_layers else None,
        mesh=self.mesh,
        name=f'block_{i:02d}',
      )(x, train=train, mask=mask)
      if metrics is not None:
        moe_metrics[i] = metrics
    x = nn.LayerNorm(dtype=self.dtype, name='encoder_norm')(x)
    if self.classifier == 'token':
      pre_logits = x[:, 0]
    elif self.classifier == 'map':
      pre_logits = heads.MapHead(self.num_heads, self.mlp_dim, self.dtype, name='map_head')(x)
    else:
      pre_logits = jnp.mean(x, axis=1)
    pre_logits = pre_logits.astype(jnp.float32)
    logits = nn.Dense(
      self.num_classes, kernel_init=nn.initializers.zeros, dtype=jnp.float32, name='head'
    )(pre_logits)

    auxiliary_loss = jnp.zeros((), jnp.float32)
    for metrics in moe_metrics.values():
      for loss_name, weight_name in AUX_LOSS_WEIGHTS.items():
        weight = getattr(self.moe, weight_name)
        if weight:
          auxiliary_loss += weight * metrics[loss_name]
    extras = {'pre_logits': pre_logits, 'auxiliary_loss': auxiliary_loss, 'moe': moe_metrics}
    return logits, extras
