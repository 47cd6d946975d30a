"""Input pipelines: in-memory datasets (digits, Fashion-MNIST) and TFDS.

Every pipeline yields, on every process, that process's rows of each global
batch as NumPy arrays: {'image': (B_p, H, W, C) float32 in [-1, 1], 'label':
(B_p,) int32}, plus 'mask' (B_p,) float32 for evaluation batches (0 on
padding).

In-memory datasets (`digits`: scikit-learn's 1,797 8x8 images; `fashion_mnist`:
the 70,000 28x28 images of the four IDX files, see `idx_files`): training
batches are a pure function of (seed, step): batch `s` holds the examples at
positions [s * B, (s + 1) * B) of a stream of seeded epoch permutations, with
augmentation seeded by (seed, step). Resuming at step `s` therefore needs
nothing but `s` (the checkpointed step), and the global batch is the same
whatever the number of processes; each process keeps its own rows of it.
Splits may be sliced as in TFDS: 'train[:54000]', 'train[54000:]',
'train[:90%]' (a held-out slice of the train split to tune on).

TFDS datasets go through `vmoe_jax.data.tfds_input` (TensorFlow is imported only
there); `fashion_mnist` falls back to it when the IDX files are absent but
TFDS has it prepared.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from collections.abc import Iterator

import numpy as np

from vmoe_jax.data import idx_files
from vmoe_jax.data import tfds_input
from vmoe_jax.data.dataset import Batch
from vmoe_jax.data.dataset import Dataset
from vmoe_jax.data.dataset import local_batch_size
from vmoe_jax.errors import UserError

# The digits split: 20% of every class goes to the test set, chosen by a
# permutation with this seed (1,438 train / 359 test images).
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2

# Where Debian's `dataset-fashion-mnist` puts the four IDX files.
FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_FILES = {
  'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
  'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
# Examples per split of the in-memory datasets (the schema checks split slices against them).
IN_MEMORY_SPLITS = {
  'digits': {'train': 1438, 'test': 359},
  'fashion_mnist': {'train': 60_000, 'test': 10_000},
}
IN_MEMORY = tuple(IN_MEMORY_SPLITS)


# --------------------------------------------------------------------------- splits


def _split_bound(text: str, size: int) -> int:
  value = int(text[:-1]) * size // 100 if text.endswith('%') else int(text)
  return value + size if value < 0 else value


def slice_split(spec: str, splits: dict[str, tuple[np.ndarray, np.ndarray]]):
  """'train', 'test', 'train[:54000]', 'train[54000:]', 'train[-10%:]' -> (images, labels)."""
  match = re.fullmatch(r'(\w+)(?:\[(-?\d+%?)?:(-?\d+%?)?\])?', spec.replace(' ', ''))
  if not match or match.group(1) not in splits:
    raise UserError(
      f'split {spec!r} not understood; use one of {sorted(splits)}, optionally sliced as in '
      "TFDS: 'train[:54000]', 'train[54000:]', 'train[:90%]'."
    )
  images, labels = splits[match.group(1)]
  size = len(labels)
  start = _split_bound(match.group(2), size) if match.group(2) else 0
  stop = _split_bound(match.group(3), size) if match.group(3) else size
  if not 0 <= start < stop <= size:
    raise UserError(
      f'split {spec!r} selects no examples of the {size} in {match.group(1)!r}; use a '
      f'slice within [0, {size}].'
    )
  return images[start:stop], labels[start:stop]


# --------------------------------------------------------------------------- sources


def digits_split() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """The fixed digits split: ((train_images, train_labels), (test_images, test_labels)).

  Images are (N, 8, 8, 1) float32 in [0, 16] (scikit-learn's values), labels
  int32. Per class, a seeded permutation puts round(20%) in the test set.
  """
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  digits = load_digits()
  images = digits.images.astype(np.float32)[..., None]
  labels = digits.target.astype(np.int32)
  rng = np.random.default_rng(DIGITS_SPLIT_SEED)
  test_index = []
  for label in range(10):
    members = np.flatnonzero(labels == label)
    num_test = round(DIGITS_TEST_FRACTION * len(members))
    test_index.append(rng.permutation(members)[:num_test])
  is_test = np.zeros(len(labels), bool)
  is_test[np.concatenate(test_index)] = True
  return (images[~is_test], labels[~is_test]), (images[is_test], labels[is_test])


def normalize_digits(images: np.ndarray) -> np.ndarray:
  return images * (2.0 / 16.0) - 1.0


def normalize_uint8(images: np.ndarray) -> np.ndarray:
  return images.astype(np.float32) * (2.0 / 255.0) - 1.0


def fashion_mnist_files(data_dir: str) -> dict[str, tuple[str, str]] | None:
  """The paths of the four IDX files in `data_dir` (plain or .gz), or None if any is missing."""
  paths = {}
  for split, stems in FASHION_MNIST_FILES.items():
    found = tuple(idx_files.find(data_dir, stem) for stem in stems)
    if None in found:
      return None
    paths[split] = found
  return paths


def fashion_mnist_missing_message(data_dir: str) -> str:
  missing = [
    stem
    for stems in FASHION_MNIST_FILES.values()
    for stem in stems
    if idx_files.find(data_dir, stem) is None
  ]
  return (
    f'Fashion-MNIST is not in {data_dir} (no {missing[0]}[.gz]) and TFDS has no fashion_mnist '
    'prepared; install it with `apt-get install dataset-fashion-mnist` (the four IDX files go '
    f'to {FASHION_MNIST_DIR}), or pass --config.input.data_dir=DIR with the four IDX files '
    '(or a TFDS data_dir where fashion_mnist is prepared).'
  )


def read_fashion_mnist(paths: dict[str, tuple[str, str]]) -> dict[str, tuple]:
  """{'train': (images (60000, 28, 28, 1) uint8, labels int32), 'test': ...}."""
  splits = {}
  for split, (image_path, label_path) in paths.items():
    images, labels = idx_files.read(image_path), idx_files.read(label_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
      raise UserError(
        f'IDX files {image_path} ({images.shape}) and {label_path} ({labels.shape}) do not '
        'hold N images and N labels; point --config.input.data_dir at the Fashion-MNIST files.'
      )
    if labels.max() >= 10:
      raise UserError(f'IDX file {label_path} has label {labels.max()}, Fashion-MNIST has 10.')
    splits[split] = (images[..., None], labels.astype(np.int32))
  return splits


# --------------------------------------------------------------------------- in-memory pipeline


def stream_positions(step: int, batch_size: int, num_examples: int, seed: int) -> np.ndarray:
  """Example indices of global batch `step` in a stream of seeded epoch permutations."""
  positions = np.arange(step * batch_size, (step + 1) * batch_size)
  epochs = positions // num_examples
  out = np.empty(batch_size, np.int64)
  for epoch in np.unique(epochs):
    perm = np.random.default_rng([seed, int(epoch)]).permutation(num_examples)
    rows = epochs == epoch
    out[rows] = perm[positions[rows] % num_examples]
  return out


def _random_shift(images: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
  """Random crop after zero-padding by `max_shift` pixels: (B, H, W, C) -> same."""
  if max_shift <= 0:
    return images
  batch, height, width, _ = images.shape
  padded = np.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
  offsets = rng.integers(0, 2 * max_shift + 1, size=(batch, 2))
  rows = offsets[:, :1] + np.arange(height)[None]  # (B, H)
  cols = offsets[:, 1:] + np.arange(width)[None]  # (B, W)
  return padded[np.arange(batch)[:, None, None], rows[:, :, None], cols[:, None, :]]


def _random_erase(images: np.ndarray, prob: float, rng: np.random.Generator) -> np.ndarray:
  """Random erasing (Zhong et al. 2020): (B, H, W, C) raw pixels -> same.

  With probability `prob` per image, a rectangle of 2-33% of the image area
  and aspect ratio 0.3-3.3 (drawn log-uniform) is filled with uniform noise
  over the pixel range of the batch.
  """
  if prob <= 0:
    return images
  batch, height, width, _ = images.shape
  area = rng.uniform(0.02, 0.33, batch) * height * width
  ratio = np.exp(rng.uniform(np.log(0.3), np.log(1 / 0.3), batch))
  h = np.clip(np.round(np.sqrt(area * ratio)), 1, height).astype(int)
  w = np.clip(np.round(np.sqrt(area / ratio)), 1, width).astype(int)
  top = rng.integers(0, height - h + 1)
  left = rng.integers(0, width - w + 1)
  rows, cols = np.arange(height)[None, :, None], np.arange(width)[None, None, :]
  box = (
    (rows >= top[:, None, None])
    & (rows < (top + h)[:, None, None])
    & (cols >= left[:, None, None])
    & (cols < (left + w)[:, None, None])
    & (rng.random(batch) < prob)[:, None, None]
  )
  low, high = float(images.min()), float(images.max())
  noise = rng.uniform(low, high, images.shape).astype(images.dtype)
  return np.where(box[..., None], noise, images)


def _padded_eval_batches(images, labels, config, process_index, process_count, limit=None):
  """Every process gets ceil(N / global_batch) batches of its rows, padded with mask 0.

  N is the number of examples, or `limit` (default: input.num_eval_examples) when > 0.
  """
  if limit is None:
    limit = config.input.num_eval_examples
  if limit > 0:
    images, labels = images[:limit], labels[:limit]
  global_batch = config.input.eval_batch_size
  local_batch = local_batch_size(global_batch, process_count, 'eval_batch_size')
  num_batches = math.ceil(len(labels) / global_batch)
  for i in range(num_batches):
    start = i * global_batch + process_index * local_batch
    index = np.arange(start, start + local_batch)
    valid = index < len(labels)
    index = np.where(valid, index, 0)
    yield {
      'image': images[index],
      'label': labels[index],
      'mask': valid.astype(np.float32),
    }


def in_memory_dataset(
  name: str,
  config,
  train: tuple[np.ndarray, np.ndarray],
  test: tuple[np.ndarray, np.ndarray],
  normalize: Callable[[np.ndarray], np.ndarray],
  num_classes: int,
  process_index: int,
  process_count: int,
) -> Dataset:
  """A `Dataset` over arrays held in memory (raw pixel values, normalised per batch)."""
  train_x, train_y = train
  test_x, test_y = test
  batch = config.input.batch_size
  local_batch = local_batch_size(batch, process_count)
  rows = slice(process_index * local_batch, (process_index + 1) * local_batch)
  seed = config.seed

  def train_batches(start_step: int) -> Iterator[Batch]:
    step = start_step
    while True:
      index = stream_positions(step, batch, len(train_y), seed)
      images = train_x[index]
      rng = np.random.default_rng([seed, step, 1])
      images = _random_shift(images, config.input.crop_padding, rng)
      if config.input.flip:
        flip = rng.random(batch) < 0.5
        images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
      images = _random_erase(images, config.input.get('random_erase', 0.0), rng)
      yield {'image': normalize(images[rows]), 'label': train_y[index][rows]}
      step += 1

  test_images, train_images = normalize(test_x), normalize(train_x)
  return Dataset(
    name=name,
    num_classes=num_classes,
    image_shape=tuple(train_x.shape[1:]),
    num_train=len(train_y),
    num_test=len(test_y),
    train_batches=train_batches,
    eval_batches=lambda: _padded_eval_batches(
      test_images, test_y, config, process_index, process_count
    ),
    train_eval_batches=lambda max_examples: _padded_eval_batches(
      train_images, train_y, config, process_index, process_count, max_examples
    ),
    test_arrays=(test_images, test_y),
    train_arrays=(train_images, train_y),
  )


def _in_memory_splits(config):
  """(splits, normalize) of an in-memory dataset, or None to read it through TFDS."""
  if config.input.dataset == 'digits':
    train, test = digits_split()
    return {'train': train, 'test': test}, normalize_digits
  data_dir = config.input.data_dir or FASHION_MNIST_DIR
  paths = fashion_mnist_files(data_dir)
  if paths is not None:
    return read_fashion_mnist(paths), normalize_uint8
  if tfds_input.is_prepared('fashion_mnist', config.input.data_dir):
    return None
  raise UserError(fashion_mnist_missing_message(data_dir))


def first_per_class(split: tuple[np.ndarray, np.ndarray], per_class: int, spec: str):
  """The first `per_class` examples of every class of (images, labels), in their order."""
  images, labels = split
  counts = np.bincount(labels)
  short = [c for c in range(len(counts)) if counts[c] < per_class]
  if short:
    raise UserError(
      f'input.train_per_class={per_class} exceeds the {counts[short[0]]} examples of class '
      f'{short[0]} in {spec!r}; use at most {counts.min()} (or 0 for all).'
    )
  rank = np.zeros(len(labels), np.int64)
  for c in range(len(counts)):
    rank[labels == c] = np.arange(counts[c])
  keep = rank < per_class
  return images[keep], labels[keep]


def create_dataset(config, process_index: int = 0, process_count: int = 1) -> Dataset:
  """The dataset named by `config.input.dataset`, read by process `process_index`."""
  local_batch = local_batch_size(config.input.batch_size, process_count)
  local_eval = local_batch_size(config.input.eval_batch_size, process_count, 'eval_batch_size')
  if config.input.dataset in IN_MEMORY:
    found = _in_memory_splits(config)
    if found is not None:
      splits, normalize = found
      train = slice_split(config.input.train_split, splits)
      if config.input.get('train_per_class', 0) > 0:
        train = first_per_class(train, config.input.train_per_class, config.input.train_split)
      return in_memory_dataset(
        config.input.dataset,
        config,
        train,
        slice_split(config.input.test_split, splits),
        normalize,
        10,
        process_index,
        process_count,
      )
  return tfds_input.create(config, process_index, process_count, local_batch, local_eval)
