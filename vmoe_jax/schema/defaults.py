"""Every configuration key, with its default and what it means.

Experiment configs (`configs/*.py`) start from `get_config()` and change a
few fields. The returned ConfigDict is locked: assigning a key that does not
exist here (in a config file or with `--config.x=y`) fails, and
`check_keys` checks a config built elsewhere against this schema's keys
(`vmoe_jax.schema.validation.validate` runs it, then checks the values).
`config_arg` is the check of the `:ARG` part of `--config=FILE:ARG` that
every config file runs.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict

from vmoe_jax.errors import UserError


def get_config() -> ml_collections.ConfigDict:
  """The defaults: a dense ViT on the offline digits data."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Model. `variant` ("Ti/4", "S/16", ...) sets width, depth, heads, MLP width
  # and patch size; the explicit fields below override it when set.
  config.model = ml_collections.ConfigDict()
  config.model.variant = config_dict.placeholder(str)
  config.model.width = config_dict.placeholder(int)
  config.model.depth = config_dict.placeholder(int)
  config.model.num_heads = config_dict.placeholder(int)
  config.model.mlp_dim = config_dict.placeholder(int)
  config.model.patch_size = config_dict.placeholder(int)
  # Head input: 'token' (class token), 'gap' (global average pooling) or 'map'
  # (multi-head attention pooling, as in big_vision).
  config.model.classifier = 'token'
  # Patch embedding: 'patch' (one patch_size x patch_size convolution, ViT) or
  # 'conv' (3x3 stride-2 convolutions, Xiao et al. 2021; patch_size a power of 2).
  config.model.stem = 'patch'
  # With stem='conv': stride-1 3x3 convolutions after each stride-2 one, one
  # count for all ('1') or one per stride-2 convolution ('0,2': two at the last).
  config.model.stem_extra_convs = '0'
  config.model.dropout = 0.0
  config.model.attention_dropout = 0.0
  config.model.dtype = 'float32'  # Compute dtype; 'bfloat16' on GPU/TPU.

  # Mixture of experts. num_experts=0 gives a dense ViT.
  config.model.moe = ml_collections.ConfigDict()
  config.model.moe.num_experts = 0
  config.model.moe.layers = 'every_2'  # 'all', 'every_N', 'last_N', 'none' or '1,3,5'.
  # Router: 'topk' (Switch / V-MoE), 'expert_choice', 'soft' (Soft MoE slots),
  # 'image_topk' (one decision per image) or 'dropless' (no capacity).
  config.model.moe.router = 'topk'
  config.model.moe.num_selected = 1  # K: 1 Switch, 2 V-MoE.
  config.model.moe.capacity_factor = 1.25
  # None: 2.0 for the token-choice routers (Switch), the training capacity
  # factor for expert_choice (whose capacity is experts per token).
  config.model.moe.eval_capacity_factor = config_dict.placeholder(float)
  # Round the capacity up to a multiple of this; None: 4 on GPU/TPU, 1 on CPU.
  config.model.moe.capacity_multiple = config_dict.placeholder(int)
  config.model.moe.batch_priority = False  # Batch Prioritized Routing at training.
  # BPR at evaluation; None: the same as batch_priority.
  config.model.moe.eval_batch_priority = config_dict.placeholder(bool)
  config.model.moe.renormalize = False  # Divide the K combine weights by their sum.
  # Multiply the MoE output (every combine weight) by this; num_experts /
  # num_selected gives a uniform router's tokens the dense MLP's weight 1.
  config.model.moe.combine_scale = 1.0
  config.model.moe.noise_std = 0.0  # Router noise std, in units of 1/num_experts.
  # Images per routing group; None: 1 for soft (an image's output never depends
  # on its batch neighbours), 8 for the others (the V-MoE paper's configs); 0:
  # all images of a device, so routing then depends on the batch and devices.
  config.model.moe.group_size = config_dict.placeholder(int)
  config.model.moe.dispatch = 'indices'  # 'indices' or 'einsum' (reference).
  config.model.moe.mlp_dim = config_dict.placeholder(int)  # Expert width; default model's.
  # Dropout inside the expert MLPs; None: model.dropout.
  config.model.moe.dropout = config_dict.placeholder(float)
  config.model.moe.load_balance_weight = 0.01  # Switch load balancing loss.
  config.model.moe.importance_weight = 0.0  # V-MoE importance loss.
  config.model.moe.load_weight = 0.0  # V-MoE load loss (needs noise_std > 0).
  # Threshold of the load loss: 'vmoe' (the K-th largest noisy logit of the
  # other experts, Riquelme et al. 2021) or 'shazeer' (Shazeer et al. 2017).
  config.model.moe.load_threshold = 'vmoe'
  # Soft MoE slots per expert; None: round(capacity_factor * tokens per group /
  # num_experts), at least 1.
  config.model.moe.slots_per_expert = config_dict.placeholder(int)
  # Dropless: rows per block of the block-padded grouped matmul.
  config.model.moe.block_size = 128
  # Dropless grouped matmul: 'ragged' (jax.lax.ragged_dot), 'blocks' (the
  # block-padded batched matmul) or 'auto' (blocks on the CPU, ragged on GPU/TPU).
  config.model.moe.grouped_matmul = 'auto'
  config.model.moe.z_loss_weight = 0.0  # Router z-loss.

  # Devices: a ('data', 'expert') mesh over all devices; the batch is split
  # over both axes and the experts over 'expert'. expert=-1 takes the largest
  # divisor of the device count that also divides num_experts.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.expert = -1

  # Input.
  config.input = ml_collections.ConfigDict()
  # 'digits' (offline, scikit-learn), 'fashion_mnist' (IDX files, see
  # input_pipeline) or a TFDS name.
  config.input.dataset = 'digits'
  config.input.data_dir = config_dict.placeholder(str)  # TFDS data_dir.
  # Splits, optionally sliced as in TFDS: 'train[:54000]', 'train[54000:]'.
  config.input.train_split = 'train'
  config.input.test_split = 'test'
  config.input.batch_size = 128  # Global batch, over all processes.
  config.input.eval_batch_size = 256
  config.input.shuffle_buffer = 10_000
  config.input.image_size = config_dict.placeholder(int)  # TFDS: resize (random resized crop).
  config.input.crop_padding = 4  # Random crop after padding by this many pixels.
  config.input.flip = True  # Random horizontal flips.
  # Random erasing (Zhong et al. 2020): the share of training images in which a
  # random rectangle is replaced by noise; 0 disables. In-memory datasets only.
  config.input.random_erase = 0.0
  config.input.num_eval_examples = -1  # Evaluate on the first N test examples; -1: all.
  # Low-data training: keep the first N train examples of every class (of the
  # sliced train split; in-memory datasets); 0: all.
  config.input.train_per_class = 0

  # Optimizer.
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'adafactor'  # 'adafactor', 'adamw' or 'sgd'.
  config.optimizer.learning_rate = 1e-3  # Peak learning rate.
  config.optimizer.beta1 = 0.9  # Momentum (Adafactor, AdamW, SGD).
  config.optimizer.beta2 = 0.999  # AdamW only; Adafactor uses min(0.999, 1 - t^-0.8).
  # Decoupled weight decay per step at the schedule's peak: update -= (lr(t) /
  # learning_rate) * weight_decay * param (Loshchilov & Hutter's AdamW). A
  # big_vision / V-MoE `wd` (multiplied by lr(t) itself) is weight_decay =
  # wd * learning_rate here. Kernels, expert weights and linear routers are
  # decayed (vmoe_jax/optim/optimizers.py).
  config.optimizer.weight_decay = 1e-4
  config.optimizer.head_weight_decay = 1e-4  # For the head kernel.
  config.optimizer.grad_clip_norm = 1.0  # Global norm; <= 0 disables.
  config.optimizer.factored_min_dim = 128  # Adafactor factors 2-D slices at least this big.
  config.optimizer.label_smoothing = 0.0
  # Parameters to freeze: a regex searched in '/'-joined parameter paths
  # (e.g. '^(?!head/)' trains only the head); '' freezes nothing.
  config.optimizer.frozen = ''

  # Learning rate schedule: linear warmup -> decay -> linear cooldown to zero.
  config.schedule = ml_collections.ConfigDict()
  config.schedule.decay = 'rsqrt'  # 'rsqrt', 'constant', 'cosine' or 'linear'.
  config.schedule.warmup_steps = 100
  config.schedule.cooldown_steps = 0
  config.schedule.timescale = 1000  # rsqrt: lr * sqrt(timescale / (step - warmup + timescale)).
  config.schedule.end_value = 0.0  # cosine and linear decay reach this at the end.

  # Training loop. `num_epochs` > 0 takes over from `num_steps`; warmup and
  # cooldown may also be given in epochs (they then override the steps).
  config.train = ml_collections.ConfigDict()
  config.train.num_steps = 1000
  config.train.num_epochs = 0.0
  config.train.warmup_epochs = 0.0
  config.train.cooldown_epochs = 0.0
  config.train.grad_accum_steps = 1  # Micro-batches per step.
  config.train.log_every = 50
  config.train.eval_every = 500  # <= 0: evaluate only at the end.
  config.train.checkpoint_every = 500  # <= 0: only the final checkpoint.
  config.train.keep_checkpoints = 3
  config.train.on_nonfinite = 'stop'  # 'stop' or 'skip' the step.
  # With on_nonfinite=skip: stop once more than this share of the steps so far
  # (after 10 steps) were skipped.
  config.train.max_skipped_share = 0.1
  # 'fail' or 'previous': on a corrupt checkpoint, stop, or resume from the newest good one.
  config.train.on_corrupt = 'fail'

  # Transfer: start the parameters from another run (a workdir or a checkpoint
  # directory); '' starts from scratch.
  config.init_from = ''
  config.init = ml_collections.ConfigDict()
  config.init.step = -1  # Checkpoint step of init_from; -1: the latest.
  # Relative std of the noise added to the expert copies when a dense
  # checkpoint is upcycled to MoE (0: exact copies).
  config.init.upcycle_noise_std = 0.0

  # Distillation from a frozen teacher.
  config.distill = ml_collections.ConfigDict()
  config.distill.teacher = ''  # Workdir of a trained teacher; '' no distillation.
  config.distill.temperature = 1.0  # Softmax temperature of teacher and student logits.
  # Weight of the label cross-entropy; the teacher term gets 1 - alpha.
  config.distill.alpha = 0.5
  # Start the student from the teacher's non-expert weights.
  config.distill.init_from_teacher = False

  # Few-shot linear evaluation on frozen pre-logits (`vmoe_jax/evaluation/fewshot.py`):
  # ridge regression on k train images per class, accuracy on the test set,
  # logged as fewshot/{k}shot. The L2 is chosen on held-out train images.
  config.fewshot = ml_collections.ConfigDict()
  config.fewshot.every = -1  # > 0: every N steps and at the end; 0: at the end; < 0: never.
  config.fewshot.shots = (1, 5, 10)
  config.fewshot.l2_regs = (1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3, 1e4)
  config.fewshot.seed = 0  # Draws of the shots.
  config.fewshot.num_trials = 5  # Draws averaged per shot count.
  config.fewshot.val_per_class = 20  # Held-out train images per class to choose the L2.
  config.fewshot.max_train_examples = 10_000  # Train images to draw from; <= 0: all.

  # Profiling: trace steps [start, start + num_steps) with jax.profiler.
  config.profile = ml_collections.ConfigDict()
  config.profile.start_step = -1  # -1: no profile.
  config.profile.num_steps = 5

  config.lock()
  return config


# Paper defaults of the two MoE families (docs/design.md, "Routing contract").
MOE_PRESETS = {
  # Fedus et al. 2021: top-1, capacity 1.25 train / 2.0 eval, load balancing
  # 0.01. The routing group (8 images) and the evaluation capacity are left to
  # the router's defaults, so that a Switch config evaluated with another
  # router (soft, expert_choice) gets that router's.
  'switch': dict(
    num_selected=1,
    capacity_factor=1.25,
    eval_capacity_factor=None,
    batch_priority=False,
    eval_batch_priority=None,
    noise_std=0.0,
    load_balance_weight=0.01,
    importance_weight=0.0,
    load_weight=0.0,
  ),
  # Riquelme et al. 2021: top-2, capacity 1.05, noise 1/E, importance and load
  # losses 0.005 each, MoE in every other block, groups of 8 images (the
  # default); trained without BPR and evaluated with it (BPR lets evaluation
  # lower the capacity).
  'vmoe': dict(
    num_selected=2,
    capacity_factor=1.05,
    eval_capacity_factor=1.05,
    batch_priority=False,
    eval_batch_priority=True,
    noise_std=1.0,
    load_balance_weight=0.0,
    importance_weight=0.005,
    load_weight=0.005,
    layers='every_2',
  ),
}


def apply_moe_preset(config: ml_collections.ConfigDict, preset: str) -> None:
  """Sets config.model.moe to the paper defaults of 'switch' or 'vmoe'."""
  if preset not in MOE_PRESETS:
    raise UserError(f'MoE preset {preset!r} is unknown; use one of {sorted(MOE_PRESETS)}.')
  config.model.moe.update(MOE_PRESETS[preset])


def config_args(arg: str | None, choices: tuple[str, ...], config_file: str) -> frozenset[str]:
  """The comma-separated arguments of `--config=FILE:A,B` (e.g. ':w32,val'), each checked.

  Every part must be one of `choices` (`config_arg` gives the one-line error).
  """
  parts = [p.strip() for p in (arg or '').split(',') if p.strip()]
  for part in parts:
    config_arg(part, choices, config_file)
  return frozenset(parts)


def config_arg(arg: str | None, choices: tuple[str, ...], config_file: str) -> str | None:
  """The argument of `--config=FILE:ARG` when FILE's get_config accepts it.

  `arg` is what get_config received (None or '' without a colon part);
  `choices` are the arguments that FILE documents besides none. Returns None
  for no argument, else `arg`; anything else is a UserError that lists the
  valid forms, so that a typo such as ':lcoal' does not silently give the
  full config.
  """
  if arg is None or arg == '':
    return None
  if arg in choices:
    return arg
  shown = os.path.relpath(config_file)
  if shown.startswith('..'):
    shown = config_file
  forms = ' or '.join(f'--config={shown}{":" + c if c else ""}' for c in ('', *choices))
  raise UserError(
    f'--config={shown}:{arg}: {arg!r} is not an argument of this config file; use {forms}.'
  )


def shrink_for_local_run(config: ml_collections.ConfigDict) -> None:
  """Makes a config small enough to check a setup on a laptop CPU in a minute.

  A 2-block, 64-wide model (8 experts if it has experts), batch 32, 20 steps,
  float32, evaluation on 256 test images. The `:local` variant of the configs.
  """
  config.model.update(
    dict(variant=None, width=64, depth=2, num_heads=2, mlp_dim=128, dtype='float32')
  )
  if config.model.moe.num_experts:
    config.model.moe.num_experts = 8
  config.input.batch_size = 32
  config.input.eval_batch_size = 32
  config.input.num_eval_examples = 256
  config.train.update(
    dict(
      num_epochs=0.0,
      num_steps=20,
      warmup_epochs=0.0,
      cooldown_epochs=0.0,
      log_every=5,
      eval_every=0,
      checkpoint_every=0,
    )
  )
  config.schedule.warmup_steps = 5
  config.schedule.cooldown_steps = 0


def flatten(config, prefix: str = '') -> dict[str, Any]:
  """A ConfigDict (or nested mapping) as {'model.moe.num_experts': 8, ...}."""
  out = {}
  for key, value in config.items():
    if isinstance(value, (Mapping, ml_collections.ConfigDict)):
      out.update(flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def all_keys() -> list[str]:
  """Every dotted key path of the schema, e.g. 'model.moe.num_experts'."""
  return list(flatten(get_config()))


def unknown_key_message(path: str, known: list[str]) -> str:
  """'unknown config key ... (did you mean ...?)' for a dotted key path."""
  close = difflib.get_close_matches(path, known, n=1)
  hint = f" (did you mean '{close[0]}'?)" if close else ''
  return f"unknown config key '{path}'{hint}; see vmoe_jax/schema/defaults.py for all keys."


def check_keys(config) -> None:
  """Raises UserError naming the first key of `config` that the schema lacks."""
  known = all_keys()
  for path in flatten(config):
    if path not in known:
      raise UserError(unknown_key_message(path, known))


def sibling_config(
  config_file: str, name: str, arg: str | None = None
) -> ml_collections.ConfigDict:
  """get_config(arg) of the config file `name` next to `config_file`.

  Lets one config build on another (configs/fashion_switch.py on
  configs/fashion_vit.py) without the configs directory being a package on
  sys.path, so `--config=/abs/path/fashion_switch.py` works from anywhere.
  """
  import importlib.util  # pylint: disable=g-import-not-at-top

  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name)
  if not os.path.exists(path):
    raise UserError(f'{config_file} builds on {path}, which does not exist; keep the two together.')
  spec = importlib.util.spec_from_file_location(f'_vmoe_config_{name[:-3]}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
