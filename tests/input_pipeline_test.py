"""Input pipelines: the digits split and batches; TFDS on mocked data."""

import numpy as np
import pytest

from vmoe_jax.data import input_pipeline
from vmoe_jax.errors import UserError
from vmoe_jax.schema import defaults


def digits_config(**input_overrides):
  config = defaults.get_config()
  config.input.dataset = 'digits'
  config.input.batch_size = 32
  config.input.eval_batch_size = 64
  config.input.crop_padding = 1
  config.input.flip = False
  for k, v in input_overrides.items():
    config.input[k] = v
  return config


def test_digits_split_is_fixed_stratified_and_disjoint():
  (train_x, train_y), (test_x, test_y) = input_pipeline.digits_split()
  assert len(train_y) == 1438 and len(test_y) == 359
  assert train_x.shape == (1438, 8, 8, 1) and train_x.dtype == np.float32
  # 20% of every class in the test set.
  _, counts = np.unique(test_y, return_counts=True)
  from sklearn.datasets import load_digits

  _, totals = np.unique(load_digits().target, return_counts=True)
  np.testing.assert_array_equal(counts, np.round(0.2 * totals))
  # Disjoint: no test image (with its label) appears in the train set.
  train_rows = {(x.tobytes(), y) for x, y in zip(train_x, train_y)}
  assert not any((x.tobytes(), y) in train_rows for x, y in zip(test_x, test_y))
  # Fixed: the same split every time.
  (_, train_y2), (test_x2, _) = input_pipeline.digits_split()
  np.testing.assert_array_equal(test_x, test_x2)
  np.testing.assert_array_equal(train_y, train_y2)


def test_digits_train_batches_are_a_function_of_the_step():
  data = input_pipeline.create_dataset(digits_config())
  first = [next(data.train_batches(0)) for _ in range(1)][0]
  it = data.train_batches(0)
  batches = [next(it) for _ in range(5)]
  resumed = next(data.train_batches(4))
  np.testing.assert_array_equal(batches[0]['image'], first['image'])
  np.testing.assert_array_equal(batches[4]['image'], resumed['image'])
  np.testing.assert_array_equal(batches[4]['label'], resumed['label'])
  assert batches[0]['image'].shape == (32, 8, 8, 1)
  assert batches[0]['image'].min() >= -1 and batches[0]['image'].max() <= 1


def test_digits_epoch_covers_every_example_once():
  config = digits_config(crop_padding=0)
  data = input_pipeline.create_dataset(config)
  num = data.num_train
  positions = np.concatenate(
    [input_pipeline.stream_positions(s, 32, num, config.seed) for s in range(num // 32)]
  )
  assert len(np.unique(positions)) == len(positions)
  # Without augmentation, the images are the train images themselves.
  batch = next(data.train_batches(0))
  train_x, _ = data.train_arrays
  idx = input_pipeline.stream_positions(0, 32, num, config.seed)
  np.testing.assert_array_equal(batch['image'], train_x[idx])


def test_digits_processes_split_the_same_global_batch():
  config = digits_config()
  whole = next(input_pipeline.create_dataset(config, 0, 1).train_batches(3))
  parts = [next(input_pipeline.create_dataset(config, p, 4).train_batches(3)) for p in range(4)]
  np.testing.assert_array_equal(np.concatenate([p['image'] for p in parts]), whole['image'])
  with pytest.raises(UserError, match='batch_size=32 does not split over 3 processes'):
    input_pipeline.create_dataset(config, 0, 3)


def test_digits_eval_batches_are_padded_and_masked():
  data = input_pipeline.create_dataset(digits_config(eval_batch_size=64))
  batches = list(data.eval_batches())
  assert len(batches) == 6  # ceil(359 / 64)
  assert sum(b['mask'].sum() for b in batches) == 359
  labels = np.concatenate([b['label'][b['mask'] > 0] for b in batches])
  np.testing.assert_array_equal(labels, data.test_arrays[1])
  # Two processes: same number of batches each, 359 valid rows in total.
  parts = [
    list(input_pipeline.create_dataset(digits_config(eval_batch_size=64), p, 2).eval_batches())
    for p in range(2)
  ]
  assert len(parts[0]) == len(parts[1])
  assert sum(b['mask'].sum() for part in parts for b in part) == 359


def test_digits_train_eval_batches_are_unaugmented_and_bounded():
  data = input_pipeline.create_dataset(digits_config(eval_batch_size=64))
  train_x, train_y = data.train_arrays
  batches = list(data.train_eval_batches(0))  # All 1,438 train images, in order.
  assert len(batches) == 23 and sum(b['mask'].sum() for b in batches) == len(train_y)
  valid = [b['mask'] > 0 for b in batches]
  images = np.concatenate([b['image'][v] for b, v in zip(batches, valid)])
  np.testing.assert_array_equal(images, train_x)
  bounded = list(data.train_eval_batches(100))
  assert len(bounded) == 2 and sum(b['mask'].sum() for b in bounded) == 100


# --------------------------------------------------------------------------- TFDS

tfds = pytest.importorskip('tensorflow_datasets')


def tfds_config(**input_overrides):
  config = defaults.get_config()
  config.input.dataset = 'cifar10'
  config.input.data_dir = '/nonexistent/tfds'
  config.input.batch_size = 8
  config.input.eval_batch_size = 8
  for k, v in input_overrides.items():
    config.input[k] = v
  return config


def test_tfds_pipeline_on_mock_data():
  with tfds.testing.mock_data(num_examples=20):
    data = input_pipeline.create_dataset(tfds_config())
    assert data.num_classes == 10 and data.image_shape == (32, 32, 3)
    assert data.num_train == 20 and data.num_test == 20
    it = data.train_batches(0)
    batches = [next(it) for _ in range(4)]
    b = batches[0]
    assert b['image'].shape == (8, 32, 32, 3) and b['image'].dtype == np.float32
    assert b['label'].shape == (8,) and b['label'].dtype == np.int32
    assert b['image'].min() >= -1.0 and b['image'].max() <= 1.0
    # Resuming at step 3 gives the batch the uninterrupted pipeline gave.
    resumed = next(data.train_batches(3))
    np.testing.assert_array_equal(resumed['image'], batches[3]['image'])
    evals = list(data.eval_batches())
    assert len(evals) == 3 and sum(e['mask'].sum() for e in evals) == 20
    # Train images for few-shot features: decoded like test images, bounded.
    train_evals = list(data.train_eval_batches(12))
    assert len(train_evals) == 2 and sum(e['mask'].sum() for e in train_evals) == 12
    assert train_evals[0]['image'].shape == (8, 32, 32, 3)
    assert sum(e['mask'].sum() for e in data.train_eval_batches(0)) == 20


def test_tfds_pipeline_per_process_shards():
  with tfds.testing.mock_data(num_examples=20):
    parts = [input_pipeline.create_dataset(tfds_config(), p, 2) for p in range(2)]
    batches = [next(p.train_batches(0)) for p in parts]
    assert all(b['image'].shape == (4, 32, 32, 3) for b in batches)
    evals = [list(p.eval_batches()) for p in parts]
    # Every process runs as many eval batches. (mock_data serves 20 examples
    # for any sub-split, so the valid-row counts mean nothing here.)
    assert len(evals[0]) == len(evals[1]) == 3
    assert all(e['image'].shape == (4, 32, 32, 3) for part in evals for e in part)


def test_tfds_missing_dataset_is_one_clear_line(tmp_path):
  config = tfds_config(data_dir=str(tmp_path))
  with pytest.raises(UserError) as info:
    input_pipeline.create_dataset(config)
  message = str(info.value)
  assert "'cifar10' is not prepared" in message and '--config.input.data_dir' in message
  assert '\n' not in message


def test_a_missing_dataset_of_varying_image_size_says_it_is_missing_first(tmp_path):
  # imagenet2012's images vary in size: input.image_size matters only once the data is there.
  config = tfds_config(dataset='imagenet2012', data_dir=str(tmp_path))
  with pytest.raises(UserError) as info:
    input_pipeline.create_dataset(config)
  assert str(info.value).startswith(f"TFDS dataset 'imagenet2012' is not prepared in {tmp_path}")


def test_unknown_dataset_name():
  with pytest.raises(UserError, match="'cifar11' is neither an in-memory dataset"):
    input_pipeline.create_dataset(tfds_config(dataset='cifar11'))


def test_train_per_class_keeps_the_first_examples_of_every_class():
  images = np.arange(10)[:, None, None, None].astype(np.float32)
  labels = np.array([0, 1, 0, 2, 1, 0, 2, 2, 1, 0], np.int32)
  kept_images, kept_labels = input_pipeline.first_per_class((images, labels), 2, 'train')
  # By hand: class 0 at 0, 2; class 1 at 1, 4; class 2 at 3, 6 -- in their order.
  np.testing.assert_array_equal(kept_images[:, 0, 0, 0], [0, 1, 2, 3, 4, 6])
  np.testing.assert_array_equal(kept_labels, [0, 1, 0, 2, 1, 2])
  with pytest.raises(
    UserError, match=r'^input.train_per_class=4 exceeds the 3 examples of class 1'
  ):
    input_pipeline.first_per_class((images, labels), 4, 'train')


def test_digits_at_10_images_per_class():
  config = defaults.get_config()
  config.input.train_per_class = 10
  config.input.crop_padding, config.input.flip = 0, False  # Batches hold the images as they are.
  dataset = input_pipeline.create_dataset(config)
  assert dataset.num_train == 100
  np.testing.assert_array_equal(np.bincount(dataset.train_arrays[1]), [10] * 10)
  # Batches draw from those 100 images only.
  batch = next(dataset.train_batches(0))
  train_images = dataset.train_arrays[0].reshape(100, -1)
  for image in batch['image'][:5].reshape(5, -1):
    assert np.any(np.all(np.isclose(train_images, image), axis=1))


def test_random_erasing_replaces_one_rectangle_in_the_chosen_share_of_images():
  from vmoe_jax.data.input_pipeline import _random_erase

  images = np.zeros((2000, 28, 28, 1), np.float32)
  images[:, 0, 0] = 255.0  # The pixel range of the batch: noise is drawn in [0, 255].
  out = _random_erase(images, 0.25, np.random.default_rng(0))
  changed = np.any(out != images, axis=(1, 2, 3))
  assert abs(changed.mean() - 0.25) < 0.03  # 2,000 draws: binomial std ~0.01.
  for image, before in zip(out[changed][:50], images[changed][:50]):
    rows, cols = np.nonzero((image != before)[..., 0])
    # One rectangle of at most 33% of the area (noise may equal 0 at a few pixels).
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert height * width <= 0.33 * 28 * 28 + 28
    assert np.all((image >= 0) & (image <= 255))
  np.testing.assert_array_equal(_random_erase(images, 0.0, np.random.default_rng(0)), images)


def test_random_erasing_is_refused_for_tfds_datasets():
  from vmoe_jax.schema import validation

  config = tfds_config()
  config.input.random_erase = 0.25
  config.model.update(dict(width=16, depth=1, num_heads=1, mlp_dim=16, patch_size=4))
  with pytest.raises(UserError, match=r'input.random_erase=0.25 applies to the in-memory'):
    validation.validate(config)
