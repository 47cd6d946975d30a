"""IDX files and the Fashion-MNIST dataset: small files written here, real ones when installed."""

import gzip
import os

import numpy as np
import pytest

from vmoe_jax.data import idx_files
from vmoe_jax.data import input_pipeline
from vmoe_jax.errors import UserError
from vmoe_jax.schema import defaults


def test_header_and_data_by_hand(tmp_path):
  # Magic 0x00000803 (uint8, 3 dims), sizes 2, 2, 3, then 12 bytes.
  data = bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + bytes(range(12))
  np.testing.assert_array_equal(
    idx_files.parse(data), np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
  )
  assert idx_files.encode(np.arange(12, dtype=np.uint8).reshape(2, 2, 3)) == data
  # Big-endian int32: 0x0C, one dim of 2.
  data = (
    bytes([0, 0, 0x0C, 1, 0, 0, 0, 2])
    + (258).to_bytes(4, 'big')
    + (-1).to_bytes(4, 'big', signed=True)
  )
  np.testing.assert_array_equal(idx_files.parse(data), [258, -1])


@pytest.mark.parametrize('suffix', ['', '.gz'])
def test_round_trip(tmp_path, suffix):
  array = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
  path = str(tmp_path / f'x{suffix}')
  idx_files.write(path, array)
  np.testing.assert_array_equal(idx_files.read(path), array)


@pytest.mark.parametrize(
  'data,message',
  [
    (b'', 'magic number \\(empty\\) is not an IDX header'),
    (b'\x1f\x8b\x08\x00', 'magic number 1f8b0800'),  # A gzip header in a plain file.
    (bytes([0, 0, 8, 3, 0, 0]), 'header for 3 dimensions is cut short'),
    (bytes([0, 0, 8, 1, 0, 0, 0, 9]) + bytes(8), 'needs 9 bytes of data, it holds 8'),
  ],
)
def test_bad_files_are_one_line_errors(tmp_path, data, message):
  path = tmp_path / 'bad'
  path.write_bytes(data)
  with pytest.raises(UserError, match=message) as info:
    idx_files.read(str(path))
  assert '\n' not in str(info.value) and str(path) in str(info.value)


def test_truncated_gzip_is_one_line(tmp_path):
  path = tmp_path / 'x.gz'
  idx_files.write(str(path), np.zeros((100, 28, 28), np.uint8))
  path.write_bytes(path.read_bytes()[:-40])
  with pytest.raises(UserError, match='cannot be read') as info:
    idx_files.read(str(path))
  assert '\n' not in str(info.value)


def write_fake_fashion(directory, num_train=40, num_test=20, gz=True):
  rng = np.random.default_rng(1)
  os.makedirs(directory, exist_ok=True)
  suffix = '.gz' if gz else ''
  for split, n in (('train', num_train), ('test', num_test)):
    image_stem, label_stem = input_pipeline.FASHION_MNIST_FILES[split]
    idx_files.write(
      os.path.join(directory, image_stem + suffix),
      rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
    )
    idx_files.write(
      os.path.join(directory, label_stem + suffix), (np.arange(n) % 10).astype(np.uint8)
    )


def fashion_config(data_dir, **overrides):
  config = defaults.get_config()
  config.input.dataset = 'fashion_mnist'
  config.input.data_dir = str(data_dir)
  config.input.batch_size = 8
  config.input.eval_batch_size = 16
  config.input.crop_padding = 2
  for key, value in overrides.items():
    config.input[key] = value
  return config


def test_fashion_mnist_from_idx_files(tmp_path):
  write_fake_fashion(tmp_path, gz=False)
  data = input_pipeline.create_dataset(fashion_config(tmp_path))
  assert (data.num_train, data.num_test, data.image_shape) == (40, 20, (28, 28, 1))
  batch = next(data.train_batches(3))
  assert batch['image'].shape == (8, 28, 28, 1) and batch['image'].dtype == np.float32
  assert batch['image'].min() >= -1 and batch['image'].max() <= 1
  np.testing.assert_array_equal(batch['image'], next(data.train_batches(3))['image'])
  # Evaluation: 20 test images in 2 batches of 16, the last padded with mask 0.
  evals = list(data.eval_batches())
  assert len(evals) == 2 and sum(b['mask'].sum() for b in evals) == 20
  raw = idx_files.read(str(tmp_path / 't10k-images-idx3-ubyte'))
  np.testing.assert_allclose(evals[0]['image'][..., 0], raw[:16] / 127.5 - 1, atol=1e-6)
  # Two processes split the same global batch.
  parts = [
    next(input_pipeline.create_dataset(fashion_config(tmp_path), p, 2).train_batches(1))
    for p in range(2)
  ]
  whole = next(data.train_batches(1))
  np.testing.assert_array_equal(np.concatenate([p['image'] for p in parts]), whole['image'])


def test_held_out_slice_of_the_train_split(tmp_path):
  write_fake_fashion(tmp_path)
  config = fashion_config(tmp_path, train_split='train[:30]', test_split='train[30:]')
  data = input_pipeline.create_dataset(config)
  assert (data.num_train, data.num_test) == (30, 10)
  np.testing.assert_array_equal(data.test_arrays[1], np.arange(30, 40) % 10)
  assert (
    input_pipeline.create_dataset(fashion_config(tmp_path, train_split='train[:75%]')).num_train
    == 30
  )
  with pytest.raises(UserError, match="split 'train\\[50:\\]' selects no examples"):
    input_pipeline.create_dataset(fashion_config(tmp_path, train_split='train[50:]'))
  with pytest.raises(UserError, match="split 'validation' not understood"):
    input_pipeline.create_dataset(fashion_config(tmp_path, test_split='validation'))


def test_missing_and_corrupt_fashion_mnist_are_one_line(tmp_path, monkeypatch):
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'no_tfds'))
  with pytest.raises(UserError) as info:
    input_pipeline.create_dataset(fashion_config(tmp_path / 'empty'))
  message = str(info.value)
  assert 'apt-get install dataset-fashion-mnist' in message and '--config.input.data_dir' in message
  assert '\n' not in message
  write_fake_fashion(tmp_path)
  path = tmp_path / 'train-labels-idx1-ubyte.gz'
  with gzip.open(path, 'wb') as f:
    f.write(bytes([0, 0, 8, 1, 0, 0, 0, 40]) + bytes(39))  # One label short.
  with pytest.raises(UserError, match='train-labels-idx1-ubyte.gz is corrupt'):
    input_pipeline.create_dataset(fashion_config(tmp_path))


@pytest.mark.skipif(
  input_pipeline.fashion_mnist_files(input_pipeline.FASHION_MNIST_DIR) is None,
  reason='Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)',
)
def test_real_fashion_mnist():
  config = defaults.get_config()
  config.input.dataset = 'fashion_mnist'
  config.input.eval_batch_size = 1000
  data = input_pipeline.create_dataset(config)
  assert (data.num_train, data.num_test, data.num_classes) == (60000, 10000, 10)
  _, counts = np.unique(data.test_arrays[1], return_counts=True)
  np.testing.assert_array_equal(counts, [1000] * 10)  # 1,000 test images per class.
