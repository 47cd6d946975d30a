"""Input pipelines: the offline `digits` data and TFDS image classification.

Both yield, on every process, that process's rows of each global batch as
NumPy arrays: {'image': (B_p, H, W, C) float32 in [-1, 1], 'label': (B_p,)
int32}, plus 'mask' (B_p,) float32 for evaluation batches (0 on padding).

Training batches are a pure function of (seed, step): batch `s` holds the
examples at positions [s * B, (s + 1) * B) of a stream of seeded epoch
permutations, with per-example augmentation keyed by that position. Resuming
at step `s` therefore needs nothing but `s` (the checkpointed step), and the
global batch is the same whatever the number of processes (digits) — the
TFDS pipeline gives each process its own slice of the split instead.

TensorFlow and tensorflow-datasets are imported only inside the TFDS path,
with GPUs hidden from TensorFlow.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from collections.abc import Iterator

import numpy as np

from vmoe_jax.errors import UserError

Batch = dict[str, np.ndarray]

# The digits split: 20% of every class goes to the test set, chosen by a
# permutation with this seed (1,438 train / 359 test images).
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2


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
  """

  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  num_train: int
  num_test: int
  train_batches: Callable[[int], Iterator[Batch]]
  eval_batches: Callable[[], Iterator[Batch]]
  train_eval_batches: Callable[[int], Iterator[Batch]] | None = None
  # Test images and labels, when small enough to hold (digits): used by the
  # routing maps and few-shot evaluation.
  test_arrays: tuple[np.ndarray, np.ndarray] | None = None
  train_arrays: tuple[np.ndarray, np.ndarray] | None = None


def local_batch_size(global_batch: int, process_count: int, what: str = 'batch_size') -> int:
  if global_batch % process_count:
    raise UserError(
      f'{what}={global_batch} does not split over {process_count} processes; use a multiple '
      f'of {process_count} (--config.input.{what}).'
    )
  return global_batch // process_count


# --------------------------------------------------------------------------- digits


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


def _digits(config, process_index: int, process_count: int) -> Dataset:
  (train_x, train_y), (test_x, test_y) = digits_split()
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
      yield {'image': normalize_digits(images[rows]), 'label': train_y[index][rows]}
      step += 1

  def eval_batches() -> Iterator[Batch]:
    yield from _padded_eval_batches(
      normalize_digits(test_x), test_y, config, process_index, process_count
    )

  def train_eval_batches(max_examples: int) -> Iterator[Batch]:
    yield from _padded_eval_batches(
      normalize_digits(train_x), train_y, config, process_index, process_count, max_examples
    )

  return Dataset(
    name='digits',
    num_classes=10,
    image_shape=(8, 8, 1),
    num_train=len(train_y),
    num_test=len(test_y),
    train_batches=train_batches,
    eval_batches=eval_batches,
    train_eval_batches=train_eval_batches,
    test_arrays=(normalize_digits(test_x), test_y),
    train_arrays=(normalize_digits(train_x), train_y),
  )


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


# --------------------------------------------------------------------------- TFDS


def _import_tf():
  """tensorflow and tensorflow_datasets, with GPUs hidden from TensorFlow."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tf.config.set_visible_devices([], 'GPU')
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  return tf, tfds


def _missing_dataset_message(name: str, data_dir: str | None) -> str:
  where = data_dir or '~/tensorflow_datasets (the TFDS default)'
  return (
    f"TFDS dataset '{name}' is not prepared in {where} and cannot be downloaded offline; "
    f'on a machine with network run `python -c "import tensorflow_datasets as tfds; '
    f"tfds.builder('{name}', data_dir='DIR').download_and_prepare()\"`, copy DIR here and "
    'pass --config.input.data_dir=DIR.'
  )


def _builder(name: str, data_dir: str | None):
  _, tfds = _import_tf()
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(
      f"'{name}' is neither 'digits' nor a TFDS dataset name; check --config.input.dataset."
    ) from None


def _as_dataset(builder, split: str, data_dir, **kwargs):
  try:
    return builder.as_dataset(split=split, **kwargs)
  except AssertionError as e:
    if 'could not find data' in str(e):
      raise UserError(_missing_dataset_message(builder.name, data_dir)) from None
    raise


def _count(ds) -> int:
  return int(ds.reduce(np.int64(0), lambda n, _: n + 1))


def _tfds(config, process_index: int, process_count: int) -> Dataset:
  tf, tfds = _import_tf()
  name, data_dir = config.input.dataset, config.input.data_dir
  builder = _builder(name, data_dir)
  image_feature = builder.info.features['image']
  num_classes = builder.info.features['label'].num_classes
  size = config.input.image_size
  native_shape = tuple(image_feature.shape)
  if size is None and None in native_shape:
    raise UserError(
      f"TFDS dataset '{name}' has images of varying size {native_shape}; set "
      '--config.input.image_size (e.g. 224) to resize them.'
    )
  image_shape = native_shape if size is None else (size, size, native_shape[-1])
  skip = {'image': tfds.decode.SkipDecoding()}
  seed = config.seed
  train_split = tfds.even_splits(config.input.train_split, process_count)[process_index]
  test_split = tfds.even_splits(config.input.test_split, process_count)[process_index]
  local_batch = local_batch_size(config.input.batch_size, process_count)
  local_eval = local_batch_size(config.input.eval_batch_size, process_count, 'eval_batch_size')
  options = tf.data.Options()
  options.deterministic = True

  def normalize(image):
    return tf.cast(image, tf.float32) * (2.0 / 255.0) - 1.0

  def augment(index, example):
    image = image_feature.decode_example(example['image'])
    element_seed = tf.stack([tf.constant(seed, tf.int64), index])
    if size is not None:  # Inception-style random resized crop.
      begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        tf.zeros([0, 0, 4]),
        seed=element_seed,
        area_range=(0.08, 1.0),
        aspect_ratio_range=(3 / 4, 4 / 3),
        use_image_if_no_bounding_boxes=True,
      )
      image = tf.slice(image, begin, crop_size)
      image = tf.image.resize(image, (size, size))
    elif config.input.crop_padding > 0:
      pad = config.input.crop_padding
      image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
      image = tf.image.stateless_random_crop(image, image_shape, seed=element_seed)
    if config.input.flip:
      image = tf.image.stateless_random_flip_left_right(image, seed=element_seed + 1)
    return {'image': normalize(image), 'label': tf.cast(example['label'], tf.int32)}

  def train_batches(start_step: int) -> Iterator[Batch]:
    read_config = tfds.ReadConfig(shuffle_seed=seed, options=options)
    ds = _as_dataset(
      builder, train_split, data_dir, shuffle_files=True, read_config=read_config, decoders=skip
    )
    ds = ds.repeat().shuffle(config.input.shuffle_buffer, seed=seed)
    # Number every example this process reads, then skip those already used.
    ds = ds.enumerate().skip(start_step * local_batch)
    ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    yield from tfds.as_numpy(ds.with_options(options))

  def decode_test(example):
    image = image_feature.decode_example(example['image'])
    if size is not None:  # Resize the shorter side to size / 0.875, then a central crop.
      shape = tf.cast(tf.shape(image)[:2], tf.float32)
      scale = (size / 0.875) / tf.reduce_min(shape)
      image = tf.image.resize(image, tf.cast(tf.round(shape * scale), tf.int32))
      image = tf.image.resize_with_crop_or_pad(image, size, size)
    return {
      'image': normalize(image),
      'label': tf.cast(example['label'], tf.int32),
      'mask': tf.constant(1.0),
    }

  num_train = _split_size(builder, config.input.train_split, data_dir, skip)
  num_test = _split_size(builder, config.input.test_split, data_dir, skip)
  if config.input.num_eval_examples > 0:
    num_test = min(num_test, config.input.num_eval_examples)

  def padded_batches(split: str, count: int, limited: bool) -> Iterator[Batch]:
    # Every process runs as many batches: its slice, padded with mask-0 rows
    # up to the batches needed by the largest slice.
    num_batches = math.ceil(math.ceil(count / process_count) / local_eval)
    ds = _as_dataset(builder, split, data_dir, shuffle_files=False, decoders=skip)
    if limited:
      ds = ds.take(math.ceil(count / process_count))
    ds = ds.map(decode_test, num_parallel_calls=tf.data.AUTOTUNE)
    padding = tf.data.Dataset.from_tensors(
      {
        'image': tf.zeros(image_shape, tf.float32),
        'label': tf.constant(0, tf.int32),
        'mask': tf.constant(0.0),
      }
    ).repeat()
    ds = ds.concatenate(padding).take(num_batches * local_eval).batch(local_eval)
    yield from tfds.as_numpy(ds.prefetch(tf.data.AUTOTUNE))

  def eval_batches() -> Iterator[Batch]:
    yield from padded_batches(test_split, num_test, config.input.num_eval_examples > 0)

  def train_eval_batches(max_examples: int) -> Iterator[Batch]:
    limited = 0 < max_examples < num_train
    count = max_examples if limited else num_train
    yield from padded_batches(train_split, count, limited)

  return Dataset(
    name=name,
    num_classes=num_classes,
    image_shape=image_shape,
    num_train=num_train,
    num_test=num_test,
    train_batches=train_batches,
    eval_batches=eval_batches,
    train_eval_batches=train_eval_batches,
  )


def _split_size(builder, split: str, data_dir, decoders) -> int:
  """Examples in a split: from the dataset info, else counted (mocked datasets)."""
  try:
    return builder.info.splits[split].num_examples
  except KeyError:
    return _count(_as_dataset(builder, split, data_dir, decoders=decoders))


def create_dataset(config, process_index: int = 0, process_count: int = 1) -> Dataset:
  """The dataset named by `config.input.dataset`, read by process `process_index`."""
  if config.input.dataset == 'digits':
    return _digits(config, process_index, process_count)
  return _tfds(config, process_index, process_count)
