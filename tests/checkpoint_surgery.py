"""Surgery on real orbax checkpoints for the tests (tests/ is on sys.path under pytest).

Orbax writes a checkpoint's state as an OCDBT database (tensorstore), whose
B-tree says in which data file, at which offset, each chunk of each array
lies; `flip_byte` flips one byte in the middle of a chunk of a named array
('params.block_01.moe.wi', 'opt_state.v.block_01.moe.wi').
"""

import hashlib
import os

import numpy as np
import tensorstore as ts


def digests(directory) -> dict:
  """{relative path: sha256} of every file under `directory` (to show nothing changed)."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _kvstore(state_dir):
  return ts.KvStore.open(f'file://{os.path.abspath(state_dir)}/').result()


def chunks(state_dir, array):
  """(key, data file, offset, length) of each chunk of `array` stored out of line."""
  kv = _kvstore(state_dir)
  manifest = ts.ocdbt.dump(kv).result()
  root = manifest['versions'][-1]['root']['location']
  node = ts.ocdbt.dump(kv, root).result()
  assert node['height'] == 0  # A small checkpoint: one B-tree leaf lists every key.
  out = []
  text = lambda v: v.decode() if isinstance(v, bytes) else v
  for entry in node['entries']:
    key, value = text(entry['key']), text(entry.get('indirect_value'))
    if key.startswith(array + '/') and value is not None:
      _, prefix, data_file, offset, length = value.split(':')
      out.append((key, os.path.join(state_dir, prefix, data_file), int(offset), int(length)))
  return out


def read_array(state_dir, array):
  """The array as tensorstore reads it now, or None when it cannot be decoded."""
  spec = {
    'driver': 'zarr',
    'kvstore': {'driver': 'ocdbt', 'base': f'file://{os.path.abspath(state_dir)}/'},
    'path': array + '/',
  }
  try:
    return ts.open(spec, open=True, read=True).result().read().result()
  except ValueError:
    return None


def flip_byte(state_dir, array) -> bool:
  """Flips one byte in the middle of the largest chunk of `array`; True if it still decodes."""
  before = read_array(state_dir, array)
  assert before is not None
  _, path, offset, length = max(chunks(state_dir, array), key=lambda c: c[3])
  with open(path, 'r+b') as f:
    f.seek(offset + length // 2)
    byte = f.read(1)
    f.seek(offset + length // 2)
    f.write(bytes([byte[0] ^ 0x5A]))
  after = read_array(state_dir, array)
  if after is None:
    return False
  assert not np.array_equal(before, after)  # The flip changed what is read.
  return True
