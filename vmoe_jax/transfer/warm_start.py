"""Starting a run from other weights: `config.init_from` and distillation teachers.

  source = load_source(path, step)            # another run, a checkpoint dir or a .npz
  params, line = initial_params(config, source, fresh_params, image_shape)

`path` is a workdir of a training run (its latest checkpoint, or `init.step`),
a checkpoint directory `WORKDIR/checkpoints/STEP`, or a big_vision / ViT
release `.npz`. Checkpoints are restored with their checksums verified
(`vmoe_jax.storage.checkpointing`) and read only: nothing is written into the source.
The mapping into the new model (new head, resized position embedding, dense
-> MoE upcycling, one-line errors for what cannot be mapped) is
`vmoe_jax.transfer.mapping.init_params`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import jax
import numpy as np

from vmoe_jax import inference
from vmoe_jax.errors import UserError
from vmoe_jax.storage import workdirs
from vmoe_jax.transfer import mapping
from vmoe_jax.transfer import npz_loader


@dataclasses.dataclass
class Source:
  """Restored source weights (NumPy arrays) and what they were trained as."""

  params: Any
  description: str
  grid: tuple[int, int] | None  # Patch grid (rows, cols); None: infer (square).
  trained: Any = None  # inference.TrainedModel of a run (None for .npz files).


def _split_checkpoint_dir(path: str, step: int) -> tuple[str, int]:
  """'W/checkpoints/500' -> ('W', 500); a workdir -> (it, step)."""
  path = os.path.abspath(path)
  parent, name = os.path.split(path)
  if re.fullmatch(r'\d+', name) and os.path.basename(parent) == workdirs.CHECKPOINT_DIR:
    return os.path.dirname(parent), int(name)
  return path, step


def load_source(path: str, step: int = -1) -> Source:
  """The weights at `path` (see the module docstring), on the host."""
  if not path:
    raise UserError('init_from is empty; pass --config.init_from=WORKDIR (or a .npz file).')
  if path.endswith('.npz'):
    return Source(npz_loader.load_big_vision(path), f'{path} (npz)', None)
  if not os.path.exists(path):
    raise UserError(
      f'init_from={path!r} does not exist; pass the --workdir of a training run, one of its '
      'checkpoints/STEP directories or a .npz file.'
    )
  workdir, step = _split_checkpoint_dir(path, step)
  trained = inference.load(workdir, step=None if step < 0 else step, key='init_from')
  params = to_host(trained.params)
  patch = trained.model.patch_size
  grid = (trained.image_shape[0] // patch, trained.image_shape[1] // patch)
  return Source(params, f'{workdir} step {trained.step}', grid, trained)


def to_host(tree: Any) -> Any:
  """NumPy copies of (possibly sharded, multi-process) arrays."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
  return jax.tree.map(np.asarray, jax.device_get(tree))


def target_grid(model, image_shape) -> tuple[int, int]:
  return (image_shape[0] // model.patch_size, image_shape[1] // model.patch_size)


def initial_params(config, source: Source, fresh: Any, model, image_shape) -> tuple[Any, str]:
  """`fresh` (the new model's initialised params) with the source's weights mapped in.

  Returns the params (NumPy / JAX arrays, the structure of `fresh`) and the
  one-line report of what was loaded, resized, upcycled and left fresh.
  """
  noise = config.init.upcycle_noise_std
  params, report = mapping.init_params(
    source.params,
    to_host(fresh),
    source_grid=source.grid,
    target_grid=target_grid(model, image_shape),
    upcycle_noise_std=noise,
    rng=jax.random.key(config.seed) if noise > 0 else None,
  )
  return params, mapping.format_report(report, prefix=f'init_from {source.description}')
