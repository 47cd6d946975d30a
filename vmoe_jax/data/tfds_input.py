"""TFDS image classification input (cifar10, cifar100, imagenet2012, fashion_mnist, ...).

Each process reads its own slice of every split (`tfds.even_splits`). Training
examples are numbered as they are read and augmented with a seed made of the
run's seed and that number (stateless ops), so resuming at step `s` skips
`s * B_p` examples and continues with the same batches. Evaluation batches are
padded with mask-0 rows so that every process runs as many of them.

TensorFlow and tensorflow-datasets are imported here only, with GPUs hidden
from TensorFlow: the model, the benchmarks and the in-memory datasets never
import them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import numpy as np

from vmoe_jax.data.dataset import Dataset
from vmoe_jax.errors import UserError


def import_tf():
  """tensorflow and tensorflow_datasets, with GPUs hidden from TensorFlow."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tf.config.set_visible_devices([], 'GPU')
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  return tf, tfds


def default_data_dir() -> str:
  return os.environ.get('TFDS_DATA_DIR', os.path.expanduser('~/tensorflow_datasets'))


def is_prepared(name: str, data_dir: str | None) -> bool:
  """Whether `data_dir` holds a prepared TFDS dataset `name` (a file check, no import)."""
  root = os.path.join(data_dir or default_data_dir(), name)
  if not os.path.isdir(root):
    return False
  for dirpath, _, filenames in os.walk(root):
    if 'dataset_info.json' in filenames and dirpath != root:
      return True
  return False


def missing_dataset_message(name: str, data_dir: str | None) -> str:
  where = data_dir or '~/tensorflow_datasets (the TFDS default)'
  return (
    f"TFDS dataset '{name}' is not prepared in {where} and cannot be downloaded offline; "
    f'on a machine with network run `python -c "import tensorflow_datasets as tfds; '
    f"tfds.builder('{name}', data_dir='DIR').download_and_prepare()\"`, copy DIR here and "
    'pass --config.input.data_dir=DIR.'
  )


def _builder(name: str, data_dir: str | None):
  _, tfds = import_tf()
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(
      f"'{name}' is neither an in-memory dataset ('digits', 'fashion_mnist') nor a TFDS "
      'dataset name; check --config.input.dataset.'
    ) from None


def _as_dataset(builder, split: str, data_dir, **kwargs):
  try:
    return builder.as_dataset(split=split, **kwargs)
  except AssertionError as e:
    if 'could not find data' in str(e):
      raise UserError(missing_dataset_message(builder.name, data_dir)) from None
    raise


def _split_size(builder, split: str, data_dir, decoders) -> int:
  """Examples in a split: from the dataset info, else counted (mocked datasets)."""
  try:
    return builder.info.splits[split].num_examples
  except KeyError:
    ds = _as_dataset(builder, split, data_dir, decoders=decoders)
    return int(ds.reduce(np.int64(0), lambda n, _: n + 1))


def _image_shape(config, builder) -> tuple[int, int, int]:
  native = tuple(builder.info.features['image'].shape)
  size = config.input.image_size
  if size is None and None in native:
    if not is_prepared(config.input.dataset, config.input.data_dir):  # Say that first.
      raise UserError(missing_dataset_message(config.input.dataset, config.input.data_dir))
    raise UserError(
      f"TFDS dataset '{config.input.dataset}' has images of varying size {native}; set "
      '--config.input.image_size (e.g. 224) to resize them.'
    )
  return native if size is None else (size, size, native[-1])


def _normalize(tf, image):
  return tf.cast(image, tf.float32) * (2.0 / 255.0) - 1.0


def _train_preprocess(tf, config, image_feature, image_shape):
  """(index, example) -> augmented {'image', 'label'}, seeded by (seed, index)."""
  size, seed = config.input.image_size, config.seed

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
      image = tf.image.resize(tf.slice(image, begin, crop_size), (size, size))
    elif config.input.crop_padding > 0:
      pad = config.input.crop_padding
      image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
      image = tf.image.stateless_random_crop(image, image_shape, seed=element_seed)
    if config.input.flip:
      image = tf.image.stateless_random_flip_left_right(image, seed=element_seed + 1)
    return {'image': _normalize(tf, image), 'label': tf.cast(example['label'], tf.int32)}

  return augment


def _eval_preprocess(tf, config, image_feature):
  """example -> {'image', 'label', 'mask'}: resize + central crop when image_size is set."""
  size = config.input.image_size

  def decode(example):
    image = image_feature.decode_example(example['image'])
    if size is not None:  # Resize the shorter side to size / 0.875, then a central crop.
      shape = tf.cast(tf.shape(image)[:2], tf.float32)
      scale = (size / 0.875) / tf.reduce_min(shape)
      image = tf.image.resize(image, tf.cast(tf.round(shape * scale), tf.int32))
      image = tf.image.resize_with_crop_or_pad(image, size, size)
    return {
      'image': _normalize(tf, image),
      'label': tf.cast(example['label'], tf.int32),
      'mask': tf.constant(1.0),
    }

  return decode


def create(config, process_index: int, process_count: int, local_batch: int, local_eval: int):
  """The `Dataset` of TFDS dataset `config.input.dataset`."""
  tf, tfds = import_tf()
  name, data_dir = config.input.dataset, config.input.data_dir
  builder = _builder(name, data_dir)
  image_feature = builder.info.features['image']
  image_shape = _image_shape(config, builder)
  skip = {'image': tfds.decode.SkipDecoding()}
  train_split = tfds.even_splits(config.input.train_split, process_count)[process_index]
  test_split = tfds.even_splits(config.input.test_split, process_count)[process_index]
  options = tf.data.Options()
  options.deterministic = True
  augment = _train_preprocess(tf, config, image_feature, image_shape)
  decode_test = _eval_preprocess(tf, config, image_feature)

  def train_batches(start_step: int) -> Iterator[dict]:
    read_config = tfds.ReadConfig(shuffle_seed=config.seed, options=options)
    ds = _as_dataset(
      builder, train_split, data_dir, shuffle_files=True, read_config=read_config, decoders=skip
    )
    ds = ds.repeat().shuffle(config.input.shuffle_buffer, seed=config.seed)
    # Number every example this process reads, then skip those already used.
    ds = ds.enumerate().skip(start_step * local_batch)
    ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    yield from tfds.as_numpy(ds.with_options(options))

  num_train = _split_size(builder, config.input.train_split, data_dir, skip)
  num_test = _split_size(builder, config.input.test_split, data_dir, skip)
  if config.input.num_eval_examples > 0:
    num_test = min(num_test, config.input.num_eval_examples)

  def padded_batches(split: str, count: int, limited: bool) -> Iterator[dict]:
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

  def train_eval_batches(max_examples: int) -> Iterator[dict]:
    limited = 0 < max_examples < num_train
    yield from padded_batches(train_split, max_examples if limited else num_train, limited)

  return Dataset(
    name=name,
    num_classes=builder.info.features['label'].num_classes,
    image_shape=image_shape,
    num_train=num_train,
    num_test=num_test,
    train_batches=train_batches,
    eval_batches=lambda: padded_batches(test_split, num_test, config.input.num_eval_examples > 0),
    train_eval_batches=train_eval_batches,
  )
