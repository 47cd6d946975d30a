"""validation.validate: the rule table covers the schema; nonsense values are one-line errors.

The battery of bad inputs from the issue is checked twice: every row against
`validate` directly (fast), and a few rows through `python -m vmoe_jax.main`
(exit status 2, one `error:` line, no traceback, nothing in the workdir).
"""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from vmoe_jax.data import input_pipeline
from vmoe_jax.errors import UserError
from vmoe_jax.schema import defaults
from vmoe_jax.schema import rules
from vmoe_jax.schema import validation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The arguments each config file documents (None: no ':ARG').
CONFIG_ARGS = {
  'cifar10_switch.py': (None, 'local'),
  'cifar10_vit.py': (None, 'local'),
  'cifar10_vmoe.py': (None, 'local'),
  'digits_finetune.py': (None, '10shot'),
  'digits_switch.py': (None,),
  'digits_vit.py': (None,),
  'fashion_distill.py': (None, 'val', 'w8', 'w16', 'w32', 'w64', 'w128'),
  'fashion_switch.py': (None, 'val', 'w8', 'w16', 'w32', 'w64', 'w128'),
  'fashion_upcycle.py': (None, 'dense', 'val', 'w8', 'w16', 'w32', 'w64', 'w128'),
  'fashion_vit.py': (None, 'val', 'w8', 'w16', 'w32', 'w64', 'w128'),
  'fashion_vmoe.py': (None, 'val', 'w8', 'w16', 'w32', 'w64', 'w128'),
}


def load_config(name, arg=None):
  """configs/NAME's get_config(arg), as `--config=configs/NAME[:arg]` gives it."""
  spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(REPO, 'configs', name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def sized_config():
  """The defaults with a model size (the schema leaves the size to the config files)."""
  config = defaults.get_config()
  config.model.update(dict(width=64, depth=4, num_heads=4, mlp_dim=128, patch_size=2))
  return config


def refused(config, num_devices=8, process_count=1) -> str:
  with pytest.raises(UserError) as info:
    validation.validate(config, num_devices=num_devices, process_count=process_count)
  message = str(info.value)
  assert '\n' not in message
  return message


# --------------------------------------------------------------------------- the table


def test_rules_cover_every_key_of_the_schema():
  assert sorted(rules.RULES) == sorted(defaults.all_keys())


def test_shipped_configs_are_config_files_of_the_table():
  files = sorted(n for n in os.listdir(os.path.join(REPO, 'configs')) if n.endswith('.py'))
  assert files == sorted(CONFIG_ARGS)


@pytest.mark.parametrize('key', defaults.all_keys())
def test_every_rule_refuses_a_value_of_no_known_type(key):
  *parents, last = key.split('.')
  nested = node = {}
  for part in parents:
    node = node.setdefault(part, {})
  node[last] = object()
  message = refused(nested, num_devices=None)
  assert message.startswith(f'{key}=<object object at ')
  assert f'pass e.g. --config.{key}=' in message


def test_a_sized_default_config_validates_and_the_defaults_say_what_is_missing():
  validation.validate(sized_config(), num_devices=8)
  message = refused(defaults.get_config())
  assert message.startswith('the model size is incomplete (model.width, model.depth,')
  config = defaults.get_config()
  config.model.variant = 'Ti/4'  # Width 192 etc., patch 4 on 8x8 digits.
  validation.validate(config, num_devices=8)


def test_none_only_for_placeholders():
  config = sized_config()
  config.model.moe.update(
    dict(
      capacity_multiple=None,
      dropout=None,
      eval_batch_priority=None,
      eval_capacity_factor=None,
      group_size=None,
    )
  )
  validation.validate(config)
  config.model.moe.capacity_factor = None  # Not a placeholder.
  assert refused(config) == (
    'model.moe.capacity_factor=None must be a number > 0; pass e.g. '
    '--config.model.moe.capacity_factor=1.25.'
  )


def test_missing_keys_take_their_defaults_and_unknown_keys_are_named():
  size = {'width': 64, 'depth': 2, 'num_heads': 2, 'mlp_dim': 8, 'patch_size': 2}
  validation.validate({'model': size})
  message = refused({'model': {'moe': {'num_expert': 4}}})
  assert message.startswith("unknown config key 'model.moe.num_expert' (did you mean")


def test_router_names_are_the_choices_of_model_moe_router():
  config = sized_config()
  for router in rules.ROUTER_NAMES:
    config.model.moe.router = router
    validation.validate(config)
  config.model.moe.router = 'top1'
  assert refused(config) == (
    "model.moe.router='top1' must be one of 'topk', 'image_topk', 'expert_choice', 'soft', "
    "'dropless'; pass e.g. --config.model.moe.router=topk."
  )


def test_in_memory_split_sizes_match_the_data():
  train, test = input_pipeline.digits_split()
  sizes = {'train': len(train[1]), 'test': len(test[1])}
  assert input_pipeline.IN_MEMORY_SPLITS['digits'] == sizes
  assert rules.IMAGE_SIDES['digits'] == train[0].shape[1] == train[0].shape[2]


# --------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize(
  'name, arg', [(name, arg) for name, args in CONFIG_ARGS.items() for arg in args]
)
def test_shipped_configs_validate(name, arg):
  for num_devices in (1, 4):
    validation.validate(load_config(name, arg), num_devices=num_devices)


@pytest.mark.parametrize('name', sorted(CONFIG_ARGS))
def test_config_files_refuse_arguments_they_do_not_document(name):
  with pytest.raises(UserError) as info:
    load_config(name, 'lcoal')
  valid = ' or '.join(f'--config=configs/{name}{":" + a if a else ""}' for a in CONFIG_ARGS[name])
  assert str(info.value) == (
    f"--config=configs/{name}:lcoal: 'lcoal' is not an argument of this config file; use {valid}."
  )
  assert load_config(name, '').to_dict() == load_config(name).to_dict()


# --------------------------------------------------------------------------- the battery

# (config file, overrides, the error message). Rows marked * are the list.
BATTERY = [
  # * Ranges of single keys.
  (
    'digits_vit.py',
    {'model.moe.num_experts': -1},
    'model.moe.num_experts=-1 must be an '
    'integer >= 0 (0: a dense ViT); pass e.g. --config.model.moe.num_experts=0.',
  ),
  (
    'digits_vit.py',
    {'optimizer.learning_rate': -1},
    'optimizer.learning_rate=-1.0 must be a '
    'number > 0 (the peak learning rate); pass e.g. --config.optimizer.learning_rate=0.001.',
  ),
  (
    'digits_switch.py',
    {'input.batch_size': 0},
    'input.batch_size=0 must be an integer >= 1; pass e.g. --config.input.batch_size=128.',
  ),
  (
    'digits_switch.py',
    {'model.moe.capacity_factor': 0},
    'model.moe.capacity_factor=0.0 must be '
    'a number > 0; pass e.g. --config.model.moe.capacity_factor=1.25.',
  ),
  (
    'digits_switch.py',
    {'model.moe.capacity_factor': -1},
    'model.moe.capacity_factor=-1.0 must '
    'be a number > 0; pass e.g. --config.model.moe.capacity_factor=1.25.',
  ),
  (
    'digits_switch.py',
    {'model.moe.eval_capacity_factor': 0},
    'model.moe.eval_capacity_factor=0.0 must be None or a number > 0 (None: 2.0, or the '
    'training factor for expert_choice); pass e.g. --config.model.moe.eval_capacity_factor=2.0.',
  ),
  (
    'digits_switch.py',
    {'model.moe.num_selected': 0},
    'model.moe.num_selected=0 must be an '
    'integer >= 1 (K, the experts per token); pass e.g. --config.model.moe.num_selected=1.',
  ),
  # * Cross-field.
  (
    'digits_switch.py',
    {'model.moe.num_selected': 9},
    'model.moe.num_selected=9 exceeds '
    'model.moe.num_experts=8; choose K between 1 and 8 (--config.model.moe.num_selected) or add '
    'experts.',
  ),
  (
    'digits_switch.py',
    {'model.patch_size': 16},
    'model.patch_size=16 is larger than the 8x8 '
    'images of digits; use a patch size of at most 8, e.g. --config.model.patch_size=4.',
  ),
  # More single keys.
  ('digits_switch.py', {'model.moe.noise_std': -0.5}, 'model.moe.noise_std=-0.5 must be'),
  ('digits_switch.py', {'model.moe.group_size': -1}, 'model.moe.group_size=-1 must be'),
  ('digits_switch.py', {'model.moe.load_balance_weight': -0.01}, 'model.moe.load_balance_weight'),
  ('digits_switch.py', {'model.moe.z_loss_weight': -1}, 'model.moe.z_loss_weight=-1.0 must'),
  (
    'digits_switch.py',
    {'model.moe.dropout': 1.0},
    'model.moe.dropout=1.0 must be None or a number in [0, 1) (None: model.dropout)',
  ),
  ('digits_switch.py', {'model.moe.capacity_multiple': 0}, 'model.moe.capacity_multiple=0 must'),
  ('digits_switch.py', {'model.moe.mlp_dim': 0}, 'model.moe.mlp_dim=0 must be None or an'),
  ('digits_switch.py', {'model.moe.dispatch': 'dense'}, "model.moe.dispatch='dense' must be one"),
  ('digits_switch.py', {'model.moe.load_threshold': 'x'}, "model.moe.load_threshold='x' must"),
  ('digits_switch.py', {'model.moe.block_size': 0}, 'model.moe.block_size=0 must be'),
  ('digits_switch.py', {'model.moe.slots_per_expert': 0}, 'model.moe.slots_per_expert=0 must'),
  ('digits_switch.py', {'model.moe.layers': 'every'}, "model.moe.layers='every' must be 'all',"),
  ('digits_switch.py', {'model.dropout': -0.1}, 'model.dropout=-0.1 must be a number in [0, 1)'),
  ('digits_switch.py', {'model.attention_dropout': 1.0}, 'model.attention_dropout=1.0 must be'),
  ('digits_switch.py', {'model.dtype': 'fp16'}, "model.dtype='fp16' must be one of 'float32',"),
  (
    'digits_switch.py',
    {'model.classifier': 'cls'},
    "model.classifier='cls' must be one of 'token', 'gap', 'map'",
  ),
  ('digits_switch.py', {'model.stem': 'cnn'}, "model.stem='cnn' must be one of 'patch', 'conv'"),
  ('digits_switch.py', {'model.variant': 'XL/16'}, "model.variant='XL/16' must be None or a size"),
  (
    'digits_switch.py',
    {'optimizer.name': 'adam'},
    "optimizer.name='adam' must be one of 'adafactor', 'adamw', 'sgd'",
  ),
  ('digits_switch.py', {'optimizer.beta1': 1.0}, 'optimizer.beta1=1.0 must be a number in [0, 1)'),
  ('digits_switch.py', {'optimizer.beta2': -0.1}, 'optimizer.beta2=-0.1 must be a number in'),
  ('digits_switch.py', {'optimizer.weight_decay': -1e-4}, 'optimizer.weight_decay=-0.0001 must'),
  ('digits_switch.py', {'optimizer.head_weight_decay': -1}, 'optimizer.head_weight_decay=-1.0'),
  ('digits_switch.py', {'optimizer.label_smoothing': 1.0}, 'optimizer.label_smoothing=1.0 must'),
  ('digits_switch.py', {'optimizer.factored_min_dim': 0}, 'optimizer.factored_min_dim=0 must'),
  (
    'digits_switch.py',
    {'optimizer.frozen': '(head'},
    "optimizer.frozen='(head' must be a Python regular expression",
  ),
  ('digits_switch.py', {'input.eval_batch_size': 0}, 'input.eval_batch_size=0 must be an'),
  ('digits_switch.py', {'input.crop_padding': -1}, 'input.crop_padding=-1 must be an integer'),
  (
    'digits_switch.py',
    {'input.num_eval_examples': 0},
    'input.num_eval_examples=0 must be -1 or an integer >= 1 (-1: all)',
  ),
  ('digits_switch.py', {'input.shuffle_buffer': 0}, 'input.shuffle_buffer=0 must be an integer'),
  ('digits_switch.py', {'input.dataset': ''}, "input.dataset='' must be a non-empty string"),
  ('digits_switch.py', {'train.num_epochs': -1}, 'train.num_epochs=-1.0 must be a number >= 0'),
  ('digits_switch.py', {'schedule.warmup_steps': -1}, 'schedule.warmup_steps=-1 must be an'),
  ('digits_switch.py', {'schedule.cooldown_steps': -5}, 'schedule.cooldown_steps=-5 must be'),
  ('digits_switch.py', {'train.warmup_epochs': -1}, 'train.warmup_epochs=-1.0 must be a number'),
  ('digits_switch.py', {'train.grad_accum_steps': 0}, 'train.grad_accum_steps=0 must be an'),
  ('digits_switch.py', {'train.log_every': 0}, 'train.log_every=0 must be an integer >= 1'),
  ('digits_switch.py', {'train.keep_checkpoints': 0}, 'train.keep_checkpoints=0 must be an'),
  ('digits_switch.py', {'train.on_nonfinite': 'ignore'}, "train.on_nonfinite='ignore' must be"),
  (
    'digits_switch.py',
    {'train.on_corrupt': 'skip'},
    "train.on_corrupt='skip' must be one of 'fail', 'previous'",
  ),
  (
    'digits_switch.py',
    {'train.max_skipped_share': 1.5},
    'train.max_skipped_share=1.5 must be a number in [0, 1]',
  ),
  ('digits_switch.py', {'mesh.expert': 0}, 'mesh.expert=0 must be -1 or an integer >= 1'),
  ('digits_switch.py', {'schedule.decay': 'exp'}, "schedule.decay='exp' must be one of 'rsqrt',"),
  ('digits_switch.py', {'schedule.end_value': -1}, 'schedule.end_value=-1.0 must be a number'),
  (
    'digits_switch.py',
    {'fewshot.shots': (1, 0)},
    'fewshot.shots=(1, 0) must be a non-empty '
    "tuple of integers >= 1; pass e.g. --config.fewshot.shots='(1,5,10)'.",
  ),
  (
    'digits_switch.py',
    {'fewshot.l2_regs': (1.0, -1.0)},
    'fewshot.l2_regs=(1.0, -1.0) must be a non-empty tuple of numbers > 0',
  ),
  ('digits_switch.py', {'fewshot.num_trials': 0}, 'fewshot.num_trials=0 must be an integer'),
  ('digits_switch.py', {'profile.start_step': -2}, 'profile.start_step=-2 must be -1 or an'),
  ('digits_switch.py', {'profile.num_steps': 0}, 'profile.num_steps=0 must be an integer >= 1'),
  ('digits_switch.py', {'init.step': -2}, 'init.step=-2 must be -1 or an integer >= 0'),
  ('digits_switch.py', {'init.upcycle_noise_std': -1}, 'init.upcycle_noise_std=-1.0 must be'),
  ('digits_switch.py', {'distill.temperature': 0}, 'distill.temperature=0.0 must be a number > 0'),
  ('digits_switch.py', {'distill.alpha': 1.5}, 'distill.alpha=1.5 must be a number in [0, 1]'),
  # Cross-field: model size, patch and stem, MoE.
  (
    'digits_switch.py',
    {'model.num_heads': 5},
    'model.width=64 is not divisible by '
    'model.num_heads=5; use a head count that divides 64, e.g. --config.model.num_heads=4.',
  ),
  (
    'digits_switch.py',
    {'model.stem': 'conv', 'model.patch_size': 3},
    "model.patch_size=3 with model.stem='conv' must be a power of 2",
  ),
  (
    'digits_switch.py',
    {'model.stem_extra_convs': '1'},
    "model.stem_extra_convs=1 needs model.stem='conv' (got 'patch'); add --config.model.stem=conv",
  ),
  ('fashion_vit.py', {'model.stem_extra_convs': '-1'}, "model.stem_extra_convs='-1' must be"),
  (
    'fashion_vit.py',
    {'model.stem_extra_convs': '0,1,2'},
    "model.stem_extra_convs='0,1,2' must be one count of stride-1 convolutions for every stage "
    "(e.g. 1) or one per stride-2 convolution (2 here, e.g. '0,2').",
  ),
  (
    'digits_switch.py',
    {'model.patch_size': None, 'model.variant': 'S/16'},
    "model.patch_size=16 (from model.variant='S/16') is larger than the 8x8 images of digits",
  ),
  (
    'fashion_vit.py',
    {'model.stem': 'patch', 'model.stem_extra_convs': '0', 'model.patch_size': 32},
    'model.patch_size=32 is '
    'larger than the 28x28 images of fashion_mnist; use a patch size of at most 28, e.g. '
    '--config.model.patch_size=4.',
  ),
  (
    'cifar10_vit.py',
    {'model.patch_size': 64},
    'model.patch_size=64 is larger than the 32x32 images of cifar10',
  ),
  (
    'cifar10_vit.py',
    {'input.dataset': 'imagenet2012', 'input.image_size': 2},
    'model.patch_size=4 is larger than the 2x2 images of imagenet2012',
  ),
  (
    'digits_switch.py',
    {'model.moe.layers': '1,4'},
    "model.moe.layers='1,4' names blocks outside the 4 blocks of the model (0..3)",
  ),
  ('digits_switch.py', {'model.moe.layers': 'none'}, "model.moe.layers='none' puts no MoE layer"),
  (
    'digits_switch.py',
    {'model.moe.load_weight': 0.005},
    'model.moe.load_weight=0.005 needs router noise',
  ),
  (
    'digits_switch.py',
    {'model.moe.slots_per_expert': 2},
    'model.moe.slots_per_expert=2 applies to the soft router only',
  ),
  (
    'digits_switch.py',
    {'model.moe.router': 'expert_choice', 'model.moe.num_selected': 2},
    "model.moe.num_selected=2 does not apply to model.moe.router='expert_choice'",
  ),
  (
    'digits_switch.py',
    {'model.moe.router': 'soft', 'model.moe.num_selected': 2},
    "model.moe.num_selected=2 does not apply to model.moe.router='soft'",
  ),
  (
    'digits_switch.py',
    {'model.moe.router': 'dropless', 'model.moe.grouped_matmul': 'cuda'},
    "model.moe.grouped_matmul='cuda' must be one of",
  ),
  # Cross-field: input.
  ('digits_switch.py', {'input.image_size': 32}, 'input.image_size=32 does not apply to digits'),
  (
    'fashion_vit.py',
    {'input.train_split': 'train[:70000]'},
    "input.train_split: split 'train[:70000]' selects no examples",
  ),
  (
    'digits_switch.py',
    {'input.test_split': 'validation'},
    "input.test_split: split 'validation' not understood",
  ),
  # Cross-field: schedule and length.
  (
    'digits_switch.py',
    {'train.num_steps': 0},
    'train.num_steps=0 must be > 0 when train.num_epochs=0',
  ),
  (
    'cifar10_switch.py',
    {'train.num_steps': 100},
    'train.num_steps=100 is ignored because '
    'train.num_epochs=200 sets the length of the run; pass --config.train.num_epochs=0 as well '
    'to train 100 steps.',
  ),
  (
    'cifar10_switch.py',
    {'schedule.warmup_steps': 10},
    'schedule.warmup_steps=10 is ignored because train.warmup_epochs=5 takes over',
  ),
  (
    'digits_switch.py',
    {'schedule.timescale': 0},
    "schedule.timescale=0 must be > 0 for schedule.decay='rsqrt'",
  ),
  (
    'fashion_vit.py',
    {'schedule.end_value': 0.01},
    'schedule.end_value=0.01 exceeds the peak optimizer.learning_rate=0.001',
  ),
  ('digits_switch.py', {'profile.start_step': 1500}, 'profile.start_step=1500 is never reached'),
  ('digits_vit.py', {'input.train_per_class': -1}, 'input.train_per_class=-1 must be'),
  (
    'cifar10_vit.py',
    {'input.train_per_class': 10},
    "input.train_per_class=10 applies to the in-memory datasets ['digits', 'fashion_mnist']",
  ),
  # Cross-field: transfer.
  ('digits_switch.py', {'init.step': 3}, "init.step=3 applies to init_from, which is ''"),
  (
    'digits_switch.py',
    {'distill.init_from_teacher': True},
    'distill.init_from_teacher=True needs a teacher',
  ),
  ('digits_switch.py', {'fewshot.val_per_class': 0}, 'fewshot.val_per_class=0 leaves no held-out'),
  # Sizes that cannot be right: more Soft MoE slots than tokens, dropless blocks of padding.
  (
    'digits_switch.py',
    {'model.moe.router': 'soft', 'model.moe.slots_per_expert': 100000},
    'model.moe.slots_per_expert=100000 exceeds the 128 tokens of a routing group '
    "(model.moe.group_size=8 images of 16 tokens); a slot is a mix of the group's tokens, so use "
    'at most 128 (e.g. --config.model.moe.slots_per_expert=16, one slot per token over the 8 '
    'experts).',
  ),
  (
    'digits_switch.py',
    {'model.moe.router': 'soft', 'model.moe.capacity_factor': 100.0},
    'model.moe.capacity_factor=100.0 gives Soft MoE 1600 slots per expert, more than the 128 '
    'tokens of a routing group',
  ),
  (
    'digits_switch.py',
    {'model.moe.router': 'dropless', 'model.moe.block_size': 10_000_000},
    'model.moe.block_size=10000000 exceeds the 6144 (token, expert) rows that a device can '
    'receive in a step (96 images of 16 tokens, K=1, from each of 4 devices), so its blocks '
    'would be padding; use at most 6144, e.g. --config.model.moe.block_size=128.',
  ),
]


def apply(config, overrides):
  for key, value in overrides.items():
    *parents, last = key.split('.')
    node = config
    for part in parents:
      node = node[part]
    node[last] = value
  return config


@pytest.mark.parametrize(
  'name, overrides, message', BATTERY, ids=[f'{n}:{o}' for n, o, _ in BATTERY]
)
def test_battery(name, overrides, message):
  # 4 devices: fashion_vit's eval batch of 500 does not split over 8.
  assert refused(apply(load_config(name), overrides), num_devices=4).startswith(message)


# --------------------------------------------------------------------------- devices, processes


def test_batches_against_devices_processes_accumulation_and_groups():
  config = load_config('digits_switch.py')
  config.input.eval_batch_size = 360
  config.model.moe.group_size = 0  # Batch 128, eval 360, 8 experts, all images of a device.
  validation.validate(config, num_devices=8)
  assert refused(config, num_devices=16) == (
    'input.eval_batch_size=360 does not split over the 16 devices; use a multiple of 16 '
    '(--config.input.eval_batch_size).'
  )
  assert refused(config, num_devices=None, process_count=3) == (
    'input.batch_size=128 does not split over 3 processes; use a multiple of 3 that is also a '
    'multiple of the device count (--config.input.batch_size).'
  )
  config.train.grad_accum_steps = 32
  assert refused(config, num_devices=8).startswith(
    'input.batch_size=128 / train.grad_accum_steps=32 = 4 images per micro-batch do not split '
    'over the 8 devices'
  )
  config.train.grad_accum_steps = 3
  assert refused(config, num_devices=None).startswith(
    'train.grad_accum_steps=3 does not divide input.batch_size=128'
  )
  config.train.grad_accum_steps = 2
  config.model.moe.group_size = 8  # 64 / 8 = 8 images per device: fine; eval 360 / 8 = 45: not.
  assert refused(config, num_devices=8) == (
    'model.moe.group_size=8 does not divide the 45 images per device of '
    'input.eval_batch_size=360 on 8 devices; use a divisor of 45 '
    '(--config.model.moe.group_size), or 0 for all images of a device.'
  )
  validation.validate(config, num_devices=1)  # 360 images on one device: groups of 8.
  validation.validate(config)  # Device checks wait for the device count.
  config.model.moe.num_experts = 0  # Dense: routing groups do not matter.
  validation.validate(config, num_devices=8)


def test_expert_mesh_axis_against_devices_and_experts():
  config = load_config('digits_switch.py')
  config.mesh.expert = 3
  assert refused(config, num_devices=8).startswith('mesh.expert=3 does not divide the 8 devices')
  config.mesh.expert = 4
  validation.validate(config, num_devices=8)
  config.model.moe.num_experts = 6
  assert refused(config, num_devices=8) == (
    'model.moe.num_experts=6 is not a multiple of mesh.expert=4; use a multiple of 4 experts or '
    'a --config.mesh.expert that divides 6.'
  )


def test_validate_is_pure():
  config = load_config('digits_switch.py')
  before = config.to_dict()
  validation.validate(config, num_devices=8)
  assert config.to_dict() == before


# --------------------------------------------------------------------------- the command line


def run_main(*args):
  return subprocess.run(
    [sys.executable, '-m', 'vmoe_jax.main', *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )


# A few battery rows end to end: a value, a cross-field check, a config argument.
COMMAND_LINE = [
  (
    ['--config=configs/digits_switch.py', '--config.model.moe.num_experts=-1'],
    'error: model.moe.num_experts=-1 must be an integer >= 0 (0: a dense ViT); pass e.g. '
    '--config.model.moe.num_experts=0.',
  ),
  (
    ['--config=configs/digits_switch.py', '--config.model.moe.capacity_factor=0'],
    'error: model.moe.capacity_factor=0.0 must be a number > 0; pass e.g. '
    '--config.model.moe.capacity_factor=1.25.',
  ),
  (
    ['--config=configs/digits_vit.py', '--config.model.patch_size=16'],
    'error: model.patch_size=16 is larger than the 8x8 images of digits; use a patch size of at '
    'most 8, e.g. --config.model.patch_size=4.',
  ),
  (
    [
      '--config=configs/digits_switch.py',
      '--config.model.moe.router=soft',
      '--config.model.moe.slots_per_expert=100000',
    ],
    'error: model.moe.slots_per_expert=100000 exceeds the 128 tokens of a routing group '
    "(model.moe.group_size=8 images of 16 tokens); a slot is a mix of the group's tokens, so use "
    'at most 128 (e.g. --config.model.moe.slots_per_expert=16, one slot per token over the 8 '
    'experts).',
  ),
  (  # Refused once the devices are known (8 here, from tests/conftest.py), before compiling.
    [
      '--config=configs/digits_switch.py',
      '--config.model.moe.router=dropless',
      '--config.model.moe.block_size=10000000',
    ],
    'error: model.moe.block_size=10000000 exceeds the 6144 (token, expert) rows that a device '
    'can receive in a step (48 images of 16 tokens, K=1, from each of 8 devices), so its blocks '
    'would be padding; use at most 6144, e.g. --config.model.moe.block_size=128.',
  ),
  (
    ['--config=configs'],
    'error: --config=configs is a directory; pass a config file, e.g. '
    '--config=configs/cifar10_switch.py.',
  ),
  (
    ['--config=configs/digits_switch.py', '--config.model.moe=3'],
    "error: 'model.moe' is a group of config keys, not a key; set one of its keys instead, e.g. "
    '--config.model.moe.batch_priority=... (all keys: vmoe_jax/schema/defaults.py).',
  ),
  (
    ['--config=configs/cifar10_switch.py:lcoal'],
    "error: --config=configs/cifar10_switch.py:lcoal: 'lcoal' is not an argument of this config "
    'file; use --config=configs/cifar10_switch.py or --config=configs/cifar10_switch.py:local.',
  ),
]


@pytest.mark.parametrize('args, line', COMMAND_LINE, ids=[a[-1] for a, _ in COMMAND_LINE])
def test_command_line_battery(tmp_path, args, line):
  result = run_main(*args, f'--workdir={tmp_path}')
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines() == [line]
  assert 'Traceback' not in result.stderr + result.stdout
  assert not os.listdir(tmp_path)


def test_a_step_larger_than_memory_is_refused_before_compiling(tmp_path):
  """Validation cannot know the host; the estimate from the shapes (vmoe_jax.models.memory) does."""
  result = run_main(
    '--config=configs/digits_switch.py',
    '--config.model.moe.capacity_factor=100000',
    f'--workdir={tmp_path}',
  )
  assert result.returncode == 2, result.stderr[-2000:]
  line = result.stderr.strip().splitlines()[-1]
  assert re.fullmatch(
    r'error: the train step needs an estimated [0-9.]+ GiB per device \(MoE buffers [0-9.]+ GiB, '
    r'sized by model.moe.capacity_factor\), more than .* of host memory.*; lower '
    r'--config.model.moe.capacity_factor \(the estimate counts the largest arrays only, from '
    r'their shapes\).',
    line,
  ), line
  assert 'Traceback' not in result.stderr and 'First step' not in result.stderr  # Not compiled.
  assert not os.listdir(tmp_path)
