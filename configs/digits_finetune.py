r"""Fine-tuning a Fashion-MNIST ViT on digits (transfer at another resolution).

  # Upstream: python -m vmoe_jax.main --config=configs/fashion_vit.py --workdir=/tmp/fashion_vit
  python -m vmoe_jax.main --config=configs/digits_finetune.py --workdir=/tmp/ft_digits \
      --config.init_from=/tmp/fashion_vit
  # The same from scratch (no init_from), and the low-data setting (10 images per class):
  python -m vmoe_jax.main --config=configs/digits_finetune.py --workdir=/tmp/scratch_digits
  python -m vmoe_jax.main --config=configs/digits_finetune.py:10shot --workdir=/tmp/ft_digits_10 \
      --config.init_from=/tmp/fashion_vit

The model is configs/fashion_vit.py's (conv stem, width 128, depth 4), so a
Fashion-MNIST checkpoint maps onto it: 8x8 digits give a 2x2 token grid
instead of 7x7 (the position embedding is resized bilinearly), and the
head, of the same 10 classes, is loaded too (init_from keeps what matches).
300 steps of AdamW 1e-3 (cosine, 50 warmup steps), 1-pixel shifts.

Expected: 96.66% digits test accuracy fine-tuned on all train images (from
scratch 97.49%), measured with the previous fashion_vit recipe as upstream
(commit 7b7da04, 2026-12-01; docs/experiments/config_history.md).
"""

from vmoe_jax.schema import defaults


def get_config(arg=None):
  arg = defaults.config_arg(arg, ('10shot',), __file__)
  config = defaults.sibling_config(__file__, 'fashion_vit.py')
  config.input.dataset = 'digits'
  config.input.train_split = 'train'
  config.input.test_split = 'test'
  config.input.eval_batch_size = 384  # All 359 test images, padded.
  config.input.batch_size = 128
  config.input.crop_padding = 1
  config.input.flip = False
  if arg == '10shot':
    config.input.train_per_class = 10
  config.optimizer.learning_rate = 1e-3
  config.schedule.warmup_steps = 50
  config.train.num_steps = 300
  config.train.log_every = 50
  config.train.eval_every = 0
  config.train.checkpoint_every = 0
  return config
