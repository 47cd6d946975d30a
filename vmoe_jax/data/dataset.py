"""What every input pipeline returns: a `Dataset` of per-process batches.

A batch is a dict of this process's rows of a global batch, as NumPy arrays:
{'image': (B_p, H, W, C) float32 in [-1, 1], 'label': (B_p,) int32}, plus
'mask' (B_p,) float32 for evaluation batches (0 on padding). B_p is the
global batch over the process count (`local_batch_size`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from collections.abc import Iterator

import numpy as np

from vmoe_jax.errors import check_process_split

Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class Dataset:
  """A dataset split into train and test, read by one process.

  Attributes:
    num_classes, image_shape (H, W, C), num_train, num_test: what it holds.
    train_batches: start_step -> iterator over this process's training rows.
    eval_batches: () -> iterator over this process's padded test rows; every
      process yields the same number of batches.
    train_eval_batches: max_examples -> the same for the first `max_examples`
      train examples (all when <= 0), without augmentation: features for
      few-shot evaluation.
    train_arrays, test_arrays: the normalised images and labels of in-memory
      datasets (None for TFDS).
  """

  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  num_train: int
  num_test: int
  train_batches: Callable[[int], Iterator[Batch]]
  eval_batches: Callable[[], Iterator[Batch]]
  train_eval_batches: Callable[[int], Iterator[Batch]] | None = None
  test_arrays: tuple[np.ndarray, np.ndarray] | None = None
  train_arrays: tuple[np.ndarray, np.ndarray] | None = None


def local_batch_size(global_batch: int, process_count: int, what: str = 'batch_size') -> int:
  """This process's rows of a global batch `input.{what}` (which must split over the processes)."""
  check_process_split(f'input.{what}', global_batch, process_count)
  return global_batch // process_count
