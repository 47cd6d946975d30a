"""Checkpoint integrity: checksums, corrupt checkpoints refused in one line, workdir safety.

The corrupt checkpoints are real ones, of a short digits run: orbax writes the
state as an OCDBT database (tensorstore), whose B-tree says in which data
file, at which offset, each chunk of each array lies. The tests flip one
byte in the middle of a chunk of a named array there.
"""

import json
import os
import re
import shutil
import stat
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from checkpoint_surgery import chunks
from checkpoint_surgery import digests
from checkpoint_surgery import flip_byte
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vmoe_jax import inference
from vmoe_jax.errors import UserError
from vmoe_jax.storage import checkpointing
from vmoe_jax.storage import integrity
from vmoe_jax.storage import workdirs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The small digits Switch-ViT of checkpointing_test: 8 devices, 4 expert shards.
SMALL = [
  '--config.model.width=32',
  '--config.model.depth=2',
  '--config.model.num_heads=2',
  '--config.model.mlp_dim=64',
  '--config.model.moe.group_size=4',
  '--config.input.batch_size=64',
  '--config.input.eval_batch_size=128',
  '--config.schedule.warmup_steps=5',
  '--config.schedule.cooldown_steps=5',
  '--config.train.log_every=5',
  '--config.train.eval_every=0',
  '--config.train.checkpoint_every=10',
  '--config.mesh.expert=4',
]
LOG_LINE = re.compile(r'^I\d{4} ')  # absl INFO lines: progress, allowed around the error.


def main(workdir, steps, *extra):
  command = [
    sys.executable,
    '-m',
    'vmoe_jax.main',
    '--config=configs/digits_switch.py',
    f'--workdir={workdir}',
    f'--config.train.num_steps={steps}',
    *SMALL,
    *extra,
  ]
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


def evaluate(workdir):
  command = [sys.executable, '-m', 'vmoe_jax.evaluate', f'--workdir={workdir}', '--nofewshot']
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


def one_error_line(result) -> str:
  """The `error:` line of a run that failed with status 2 and printed nothing else."""
  assert result.returncode == 2, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert lines and lines[-1].startswith('error: '), result.stderr[-3000:]
  others = [line for line in lines[:-1] if not LOG_LINE.match(line)]
  assert not others, others  # No tracebacks, no 'Event loop is closed', no warnings.
  return lines[-1]


def listing(workdir) -> dict:
  """Every file and directory under `workdir` with its size and mtime."""
  out = {}
  for root, dirs, files in os.walk(workdir):
    for name in dirs + files:
      path = os.path.join(root, name)
      info = os.stat(path)
      out[os.path.relpath(path, workdir)] = (info.st_size, info.st_mtime_ns)
  return out


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  """A finished 20-step run with checkpoints 10 and 20, written with checksums."""
  workdir = tmp_path_factory.mktemp('integrity') / 'run'
  result = main(workdir, 20)
  assert result.returncode == 0, result.stderr[-3000:]
  return str(workdir)


def _copy(run_dir, tmp_path, name='w'):
  workdir = tmp_path / name
  shutil.copytree(run_dir, workdir)
  return workdir


# --------------------------------------------------------------------------- corrupt bytes


def test_a_flipped_params_byte_is_refused_by_resume_evaluate_and_inference(run_dir, tmp_path):
  workdir = _copy(run_dir, tmp_path)
  state_dir = workdir / 'checkpoints' / '20' / 'state'
  decodes = flip_byte(state_dir, 'params.block_01.moe.wi')
  expected = 'does not match its checksum' if decodes else 'cannot be read'
  before = listing(workdir)

  line = one_error_line(main(workdir, 30))  # A longer run: it must restore checkpoint 20.
  assert line.startswith(f'error: checkpoint {workdir}/checkpoints/20 is corrupt: ')
  assert f'params/block_01/moe/wi {expected}' in line, line
  assert 'on_corrupt=previous' in line
  line = one_error_line(evaluate(workdir))
  assert f'checkpoint {workdir}/checkpoints/20 is corrupt: params/block_01/moe/wi' in line, line
  assert '--step=N' in line
  with pytest.raises(UserError, match=r'/checkpoints/20 is corrupt: params/block_01/moe/wi '):
    inference.load(str(workdir))
  assert inference.load(str(workdir), step=10).step == 10  # The earlier one still loads.
  assert listing(workdir) == before  # Nothing written, nothing touched.


def test_a_flipped_optimizer_byte_stops_resume_but_not_inference(run_dir, tmp_path):
  workdir = _copy(run_dir, tmp_path)
  state_dir = workdir / 'checkpoints' / '20' / 'state'
  decodes = flip_byte(state_dir, 'opt_state.v.block_01.moe.wi')
  expected = 'does not match its checksum' if decodes else 'cannot be read'
  before = listing(workdir)
  line = one_error_line(main(workdir, 30))
  assert line.startswith(f'error: checkpoint {workdir}/checkpoints/20 is corrupt: ')
  assert f'opt_state/v/block_01/moe/wi {expected}' in line, line
  assert listing(workdir) == before
  # Inference reads (and verifies) only the params, which are intact.
  a = jax.device_get(inference.load(str(workdir)).params)
  b = jax.device_get(inference.load(run_dir).params)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_undecodable_bytes_name_the_array_without_tensorstore_reprs(run_dir, tmp_path):
  workdir = _copy(run_dir, tmp_path)
  state_dir = workdir / 'checkpoints' / '20' / 'state'
  _, path, offset, _ = chunks(state_dir, 'opt_state.v.block_01.moe.wi')[0]
  with open(path, 'r+b') as f:  # Garble 4 KB from the start of a chunk: its zstd header.
    f.seek(offset)
    f.write(b'\x00garbage' * 512)
  line = one_error_line(main(workdir, 30))
  assert re.search(r'is corrupt: opt_state/v/block_01/moe/w[io] cannot be read \(ZSTD', line), line
  assert 'pybind' not in line and 'TensorStore(' not in line


def test_on_corrupt_previous_resumes_from_the_checkpoint_before_and_keeps_the_bytes(
  run_dir, tmp_path
):
  workdir = _copy(run_dir, tmp_path)
  flip_byte(workdir / 'checkpoints' / '20' / 'state', 'params.block_01.moe.wi')
  corrupt = digests(workdir / 'checkpoints' / '20')
  result = main(workdir, 30, '--config.train.on_corrupt=previous')
  assert result.returncode == 0, result.stderr[-3000:]
  # The failed restore left nothing behind in the process that went on.
  assert 'Traceback' not in result.stderr and 'Event loop is closed' not in result.stderr
  # Its two warnings (orbax may add a timing notice on a loaded machine).
  warnings = [l for l in result.stderr.splitlines() if l.startswith('W') and 'corrupt' in l]
  assert len(warnings) == 2, warnings
  assert f'checkpoint {workdir}/checkpoints/20 is corrupt: params/block_01/moe/wi' in warnings[0]
  assert '20.corrupt' in warnings[1]
  assert 'Resumed from checkpoint 10.' in result.stderr
  assert json.loads((workdir / 'results.json').read_text())['step'] == 30
  # The corrupt checkpoint is kept, byte for byte, beside the new checkpoint 20.
  assert digests(workdir / 'checkpoints' / '20.corrupt') == corrupt
  steps = checkpointing.create_manager(str(workdir), create=False).all_steps()
  assert sorted(steps) == [10, 20, 30]
  assert inference.load(str(workdir), step=20).step == 20  # The new one verifies.


def test_on_corrupt_is_checked(run_dir, tmp_path):
  workdir = _copy(run_dir, tmp_path)
  line = one_error_line(main(workdir, 30, '--config.train.on_corrupt=ignore'))
  assert "train.on_corrupt='ignore' must be one of 'fail', 'previous'" in line


# --------------------------------------------------------------------------- checksums


def _all_bit_flips(x: np.ndarray) -> np.ndarray:
  """x with one bit flipped, for every bit of every element: (elements * bits, *shape)."""
  bits = x.dtype.itemsize * 8
  words = x.view(f'u{x.dtype.itemsize}').reshape(-1)
  out = np.repeat(words[None], words.size * bits, axis=0)
  for i in range(words.size):
    for b in range(bits):
      out[i * bits + b, i] ^= words.dtype.type(1 << b)
  return out.view(x.dtype).reshape(-1, *x.shape)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_every_single_bit_flip_changes_the_checksum(dtype):
  x = np.asarray(jax.random.normal(jax.random.key(0), (4, 16)), dtype)
  flipped = _all_bit_flips(x)
  sums = np.asarray(jax.jit(jax.vmap(integrity._leaf_sums))(flipped))
  reference = np.asarray(integrity._leaf_sums(jnp.asarray(x)))
  assert len(flipped) == x.size * jnp.dtype(dtype).itemsize * 8
  assert np.all(sums[:, 0] != reference[0])  # Odd multipliers: every flip shows.
  assert np.all(sums[:, 1] != reference[1])  # So does the second sum.
  assert len({tuple(s[:2]) for s in sums}) == len(sums)  # And no two flips collide.
  # Through the public function, NaN and inf flips are also counted as non-finite.
  checksums, nonfinite = integrity.array_checksums({'x': x})
  assert checksums['x'] == f'{reference[0]:08x}{reference[1]:08x}' and nonfinite == {'x': 0}
  assert sum(sums[:, 2]) == sum(not np.isfinite(np.asarray(f, np.float32)).all() for f in flipped)


def test_checksums_are_the_same_on_every_mesh():
  key = jax.random.key(1)
  tree = {
    'w': jax.random.normal(key, (8, 32, 64)),
    'b': jax.random.normal(key, (8, 64)).astype(jnp.bfloat16),
    'i': jnp.arange(8 * 12, dtype=jnp.int32).reshape(8, 12),
    'rng': jax.random.split(key, 8),
    'typed_key': jax.random.split(jax.random.key(2), 8),
    'step': jnp.int32(7),
  }
  one = jax.device_put(tree, jax.devices()[0])
  reference = integrity.array_checksums(one)
  mesh = jax.make_mesh((2, 4), ('data', 'expert'))
  for spec in (P('expert'), P('data', 'expert'), P(('data', 'expert')), P()):

    def place(x, spec=spec):
      spec = spec if x.ndim >= len(spec) else P()
      return jax.device_put(x, NamedSharding(mesh, spec))

    sharded = jax.tree.map(place, tree)
    assert integrity.array_checksums(sharded) == reference, spec
  assert reference[0]['step'].startswith('00000007')  # 7 * (2 * 0 + 1).
  host = jax.device_get({k: v for k, v in tree.items() if k != 'typed_key'})
  assert integrity.array_checksums(host)[0] == {
    k: v for k, v in reference[0].items() if k != 'typed_key'
  }


def test_checkpoint_of_8_devices_verifies_on_1(run_dir):
  """Written on 8 devices with 4 expert shards; the checksums hold on one device."""
  restored = inference.load(run_dir, devices=jax.devices()[:1])
  assert restored.mesh.size == 1
  with open(os.path.join(run_dir, 'checkpoints', '20', 'meta', 'metadata')) as f:
    meta = json.load(f)
  checksums, _ = integrity.array_checksums({'params': restored.params})
  assert checksums and all(meta['checksums'][k] == v for k, v in checksums.items())


# --------------------------------------------------------------------------- non-finite


def _write(workdir, step, state, meta):
  manager = checkpointing.create_manager(str(workdir), keep=0, async_save=False)
  try:
    manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
    )
  finally:
    manager.close()


def test_nonfinite_params_are_neither_saved_nor_restored(run_dir, tmp_path, caplog):
  workdir = _copy(run_dir, tmp_path)
  params = jax.device_get(inference.load(str(workdir)).params)
  bad = jax.tree.map(np.array, params)
  bad['head']['kernel'][3, 1] = np.nan
  bad['head']['kernel'][0, 0] = np.inf
  manager = checkpointing.create_manager(str(workdir))
  with pytest.raises(UserError, match=r'params/head/kernel is not finite at step 21 \(2 values\)'):
    checkpointing.save(manager, 21, {'params': bad}, {'step': 21})
  manager.close()
  assert not (workdir / 'checkpoints' / '21').exists()
  # Written anyway (checksums that match the NaNs): refused on restore, naming the array.
  checksums, _ = integrity.array_checksums({'params': bad})
  meta = {'step': 22, 'checksums': checksums, 'checksum_version': 1}
  _write(workdir, 22, {'params': bad}, meta)
  with pytest.raises(UserError, match=r'checkpoints/22 is corrupt: params/head/kernel holds 2 non'):
    inference.load(str(workdir), step=22)
  # A checkpoint of an earlier vmoe_jax (no checksums): a warning, and NaNs still refused.
  _write(workdir, 23, {'params': params}, {'step': 23})
  with caplog.at_level('WARNING', logger='vmoe_jax'):
    assert inference.load(str(workdir), step=23).step == 23
  assert 'checkpoints/23 has no checksums' in caplog.text and 'cannot be verified' in caplog.text
  _write(workdir, 24, {'params': bad}, {'step': 24})
  with pytest.raises(UserError, match=r'checkpoints/24 is corrupt: params/head/kernel holds 2 non'):
    inference.load(str(workdir), step=24)


# --------------------------------------------------------------------------- workdir


def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
  path = tmp_path / 'a_file'
  path.write_text('keep me')
  line = one_error_line(main(path, 2))
  assert line == f'error: --workdir={path} is a file, not a directory; pass a directory.'
  assert path.read_text() == 'keep me'
  with pytest.raises(UserError, match=r'a_file/run cannot be written \(NotADirectoryError'):
    workdirs.check_workdir_writable(str(path / 'run'))


def test_a_finished_run_rerun_writes_nothing(run_dir, tmp_path):
  workdir = _copy(run_dir, tmp_path)
  config = (workdir / 'config.json').read_text()
  before = listing(workdir)
  for root, dirs, files in os.walk(workdir):  # Read-only (root still writes: hence the listing).
    for name in dirs + files:
      path = os.path.join(root, name)
      os.chmod(path, os.stat(path).st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
  os.chmod(workdir, 0o555)
  try:
    same = main(workdir, 20)
    assert same.returncode == 0, same.stderr[-3000:]
    assert 'already holds a run finished at step 20; nothing to do' in same.stderr
    other = main(workdir, 20, '--config.optimizer.learning_rate=0.002')
    line = one_error_line(other)
    assert line == (
      f'error: {workdir} already holds a finished run; it differs from this command in '
      'optimizer.learning_rate (was 0.006, now 0.002); use a new --workdir.'
    )
  finally:
    os.chmod(workdir, 0o755)
  assert listing(workdir) == before
  assert (workdir / 'config.json').read_text() == config
