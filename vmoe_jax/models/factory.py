"""Building the model of a config: `create_model(config, num_classes, mesh)`.

The trainer, the evaluation, inference, the benchmarks and the profiler all
build their model here, from `config.model` (sizes, stem, head, dtype) and
the one `MoeSpec` of `config.model.moe`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vmoe_jax.errors import UserError
from vmoe_jax.models import vit
from vmoe_jax.moe.spec import MoeSpec

SIZE_KEYS = ('width', 'depth', 'num_heads', 'mlp_dim', 'patch_size')
DTYPES = ('float32', 'bfloat16', 'float16')


def model_size(config) -> dict[str, int]:
  """Width, depth, heads, MLP width and patch size from the variant and overrides."""
  model = config.model
  settings = vit.decode_variant(model.variant) if model.variant else {}
  for key in SIZE_KEYS:
    if model[key] is not None:
      settings[key] = model[key]
  missing = [k for k in SIZE_KEYS if k not in settings]
  if missing:
    raise UserError(
      f'model size incomplete: set --config.model.variant (e.g. S/16) or '
      f'{", ".join("--config.model." + k for k in missing)}.'
    )
  if settings['width'] % settings['num_heads']:
    raise UserError(
      f'model width {settings["width"]} is not divisible by num_heads {settings["num_heads"]}.'
    )
  return settings


def create_model(config, num_classes: int, mesh=None, moe: MoeSpec | None = None) -> vit.ViT:
  """The ViT of `config.model`; MoE layers get `mesh` for expert parallelism.

  `moe` replaces the spec built from `config.model.moe` (e.g. another
  evaluation capacity).
  """
  dtype = config.model.dtype
  if dtype not in DTYPES:
    raise UserError(f'model.dtype={dtype!r} is unknown; use one of {DTYPES}.')
  if moe is None:
    moe = MoeSpec.from_config(config)
  return vit.ViT(
    num_classes=num_classes,
    classifier=config.model.classifier,
    stem=config.model.stem,
    stem_extra_convs=config.model.stem_extra_convs,
    dropout_rate=config.model.dropout,
    attention_dropout_rate=config.model.attention_dropout,
    dtype=jnp.dtype(dtype),
    moe=moe,
    mesh=mesh if moe is not None else None,
    **model_size(config),
  )


def count_params(params: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
