"""Loading a trained model for inference from user code.

  from vmoe_jax import inference
  model = inference.load('/tmp/digits_switch')        # latest checkpoint
  logits = model.logits(images)                       # (N, H, W, C) in [-1, 1]
  labels = model.predict(images)
  features = model.features(images)                   # pre-logits, (N, D)

`load` rebuilds the model from `workdir/config.json` and `workdir/dataset.json`
and restores the checkpoint onto a mesh of the devices you give it (all by
default), whatever mesh wrote it. Images are expected as the input pipelines
produce them: a batch (N, H, W, C) of the training images' size, floats in
[-1, 1] (`input_pipeline.normalize_*`: 0-255 pixels as x / 127.5 - 1,
scikit-learn's 0-16 digits as x / 8 - 1). Anything else is refused with a
one-line UserError that says what to pass (integer images such as uint8 are
refused rather than guessed at: their scale is the caller's to state).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from vmoe_jax.errors import UserError
from vmoe_jax.models import factory
from vmoe_jax.runtime import sharding
from vmoe_jax.schema import defaults
from vmoe_jax.storage import checkpointing
from vmoe_jax.storage import workdirs


@dataclasses.dataclass
class TrainedModel:
  """A restored model, its params placed on `mesh`, with batched apply functions."""

  config: ml_collections.ConfigDict
  model: Any
  params: Any
  mesh: Mesh
  step: int
  num_classes: int
  image_shape: tuple[int, ...]
  dataset: str = ''  # The name of the training data (dataset.json), for messages.

  @functools.cached_property
  def _apply(self):
    return jax.jit(lambda params, images: self.model.apply({'params': params}, images, train=False))

  def apply(self, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, dict]:
    """Logits (N, classes) and pre-logits (N, D) for images (N, H, W, C), in batches.

    The last batch is padded to a multiple of the device count; with MoE
    layers, routing groups form within a batch, as in evaluation. Images of
    another shape, dtype or range than the training images are a UserError
    (`check_images`).
    """
    images = self.check_images(images)
    devices = self.mesh.size
    step = max(devices, batch_size - batch_size % devices)  # Images per call.
    logits, features = [], []
    for start in range(0, len(images), step):
      chunk = images[start : start + step]
      size = len(chunk)
      group = self.model.moe.group_size if self.model.moe is not None else 1
      multiple = devices * max(1, group)
      padded = -(-size // multiple) * multiple
      if padded != size:
        chunk = np.concatenate([chunk, np.zeros((padded - size, *chunk.shape[1:]), chunk.dtype)])
      batch = jax.device_put(chunk, sharding.batch_sharding(self.mesh))
      out, extras = self._apply(self.params, batch)
      logits.append(np.asarray(out)[:size])
      features.append(np.asarray(extras['pre_logits'])[:size])
    return np.concatenate(logits), {'pre_logits': np.concatenate(features)}

  def _scaling(self) -> str:
    raw = "scikit-learn's 0-16 digits as x / 8 - 1" if self.dataset == 'digits' else ''
    pixels = '0-255 pixels as x.astype(np.float32) / 127.5 - 1'
    return f'{raw} or {pixels}' if raw else pixels

  def check_images(self, images) -> np.ndarray:
    """`images` as float32 (N, H, W, C) in [-1, 1], or a one-line UserError saying what to pass."""
    array = np.asarray(images)
    shape, expected = tuple(array.shape), tuple(self.image_shape)
    takes = f'the model takes a batch (N, {", ".join(map(str, expected))}) of floats in [-1, 1]'
    trained = f' (trained on {self.dataset})' if self.dataset else ''
    if array.dtype.kind not in 'f':
      raise UserError(
        f'images have dtype {array.dtype}; {takes}, scaled as in training: pass {self._scaling()}.'
      )
    if shape == expected:
      raise UserError(f'images have shape {shape}, one image; {takes}: pass images[None].')
    if len(expected) == 3 and shape[1:] == expected[:2] and expected[2] == 1:
      raise UserError(f'images have shape {shape}; {takes}: add the channel, images[..., None].')
    if array.ndim != 4 or shape[1:] != expected:
      raise UserError(f'images have shape {shape}; {takes}{trained}.')
    if not array.size:
      raise UserError(f'images have shape {shape}, no image; pass at least one.')
    array = array.astype(np.float32, copy=False)
    low, high = float(np.min(array)), float(np.max(array))
    if not (np.isfinite(low) and np.isfinite(high)):
      raise UserError('images hold NaN or infinite values; pass finite values in [-1, 1].')
    if low < -1.0 - _RANGE_SLACK or high > 1.0 + _RANGE_SLACK:
      raise UserError(
        f'images range from {low:g} to {high:g}; {takes}, scaled as in training: pass '
        f'{self._scaling()}.'
      )
    return array

  def logits(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    return self.apply(images, batch_size)[0]

  def predict(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    return np.argmax(self.logits(images, batch_size), axis=-1)

  def features(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    return self.apply(images, batch_size)[1]['pre_logits']


# Values past [-1, 1] by this much are still the training range (float rounding).
_RANGE_SLACK = 1e-3


def check_run(workdir: str, key: str = 'workdir') -> None:
  """A one-line UserError, naming `key` (the flag or config key given), unless `workdir` is a run.

  A run's directory holds its config.json, dataset.json and checkpoints/.
  """
  given = f'{key}={workdir!r}'
  fix = 'pass the --workdir of a training run'
  if not os.path.exists(workdir):
    raise UserError(f'{given} does not exist; {fix}.')
  if not os.path.isdir(workdir):
    raise UserError(f'{given} is a file, not a directory; {fix}.')
  for name in (workdirs.CONFIG_FILE, workdirs.DATASET_FILE, workdirs.CHECKPOINT_DIR):
    path = os.path.join(workdir, name)
    if not os.path.exists(path):
      raise UserError(
        f'{given} is not the workdir of a training run ({path} does not exist); {fix}.'
      )
  if not workdirs.checkpoint_steps(workdir):
    raise UserError(f'{given} holds no checkpoint yet; train it first, or {fix}.')


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config of a training run (`workdir/config.json`) over today's defaults.

  Keys added to the schema after the run was made take their defaults.
  """
  config = defaults.get_config()
  config.unlock()
  _merge(config, workdirs.read_config(workdir))
  return config


def _merge(config: ml_collections.ConfigDict, saved: dict) -> None:
  for key, value in saved.items():
    if isinstance(value, dict) and isinstance(config.get(key), ml_collections.ConfigDict):
      _merge(config[key], value)
    else:
      if isinstance(config.get(key), str) and type(value) is int:  # pylint: disable=unidiomatic-typecheck
        value = str(value)  # Saved before the key became a string (model.stem_extra_convs).
      config[key] = tuple(value) if isinstance(value, list) else value


def restore_params(
  workdir: str, config, mesh: Mesh, num_classes: int, image_shape, step: int | None = None
):
  """(model, params, step): the verified params of checkpoint `step` (default: latest) on `mesh`."""
  model = factory.create_model(config, num_classes, mesh)
  target = factory.abstract_params(model, mesh, image_shape)
  params, step = checkpointing.load_params(workdir, target, step)
  return model, params, step


def load(
  workdir: str,
  step: int | None = None,
  devices=None,
  expert: int = -1,
  eval_capacity_factor: float | None = None,
  batch_priority: bool | None = None,
  key: str = 'workdir',
) -> TrainedModel:
  """Restores a trained model from `workdir` for inference.

  Args:
    workdir: the --workdir of a training run.
    step: checkpoint to load; default the latest.
    devices: devices of the inference mesh; default all.
    expert: size of the expert mesh axis (-1: the largest that fits).
    eval_capacity_factor, batch_priority: override the routing of MoE layers
      at inference (e.g. a lower capacity with BPR to save compute).
    key: what `workdir` was given as, for the messages of a path that is not
      a run (e.g. 'init_from', 'distill.teacher', '--workdir').

  Raises:
    UserError (one line) when `workdir` is not a training run with a
    checkpoint, or the checkpoint cannot be read.
  """
  workdir = os.path.abspath(workdir)
  check_run(workdir, key)
  config = run_config(workdir)
  if eval_capacity_factor is not None:
    config.model.moe.eval_capacity_factor = eval_capacity_factor
  if batch_priority is not None:
    config.model.moe.eval_batch_priority = batch_priority
  info = workdirs.read_dataset_info(workdir)
  mesh = sharding.create_mesh(expert, config.model.moe.num_experts, devices)
  image_shape = tuple(info['image_shape'])
  model, params, step = restore_params(
    workdir, config, mesh, info['num_classes'], image_shape, step
  )
  return TrainedModel(
    config=config,
    model=model,
    params=params,
    mesh=mesh,
    step=int(step),
    num_classes=info['num_classes'],
    image_shape=image_shape,
    dataset=str(info.get('name', '')),
  )


def accuracy(trained: TrainedModel, images: np.ndarray, labels: np.ndarray, **kwargs) -> float:
  return float(jnp.mean(trained.predict(images, **kwargs) == labels))
