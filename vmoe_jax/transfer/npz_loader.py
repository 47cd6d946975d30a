"""ViTs published as `.npz` (the ViT / AugReg release and big_vision) in our names.

`load_npz` reads the arrays of a `.npz` file; `from_big_vision` renames them
into the nested params of `vmoe_jax.models` (a UserError for a key that is
not a ViT's); `load_big_vision` does both. The result is a source for
`vmoe_jax.transfer.mapping.init_params` (`init_from` of a `.npz`, see
`vmoe_jax.transfer.warm_start`).
"""

from __future__ import annotations

import math
import os
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from vmoe_jax.errors import UserError
from vmoe_jax.transfer.mapping import unflatten

_PREFIXES = ('params/', 'opt/target/')  # big_vision; old ViT releases with optimizer state.
_TOP_LEVEL = {
  'embedding/kernel': 'embedding/kernel',
  'embedding/bias': 'embedding/bias',
  'cls': 'cls',
  'pos_embedding': 'pos_embedding',  # big_vision: no class-token position.
  'Transformer/posembed_input/pos_embedding': 'pos_embedding',  # ViT release.
  'Transformer/encoder_norm/scale': 'encoder_norm/scale',
  'Transformer/encoder_norm/bias': 'encoder_norm/bias',
  'head/kernel': 'head/kernel',
  'head/bias': 'head/bias',
  # The ViT release's representation layer: kept by name, no model of ours uses it.
  'pre_logits/kernel': 'pre_logits/kernel',
  'pre_logits/bias': 'pre_logits/bias',
}
# Inside an encoder block or the MAP head: (pattern, our name). The indices
# differ between the ViT release (MultiHeadDotProductAttention_1,
# LayerNorm_2, MlpBlock_3) and big_vision (_0, LayerNorm_1, MlpBlock_0).
_BLOCK_RULES = (
  (r'LayerNorm_0/(scale|bias)', r'norm_attention/\1'),
  (r'LayerNorm_[12]/(scale|bias)', r'norm_mlp/\1'),
  (r'MultiHeadDotProductAttention_[01]/(query|key|value|out)/(kernel|bias)', r'attention/\1/\2'),
  (r'MlpBlock_[03]/(Dense_[01])/(kernel|bias)', r'mlp/\1/\2'),
)
_MAP_HEAD_RULES = (
  (r'probe', 'probe'),
  (r'LayerNorm_0/(scale|bias)', r'norm/\1'),
  (r'MultiHeadDotProductAttention_0/(query|key|value|out)/(kernel|bias)', r'attention/\1/\2'),
  (r'MlpBlock_0/(Dense_[01])/(kernel|bias)', r'mlp/\1/\2'),
)


_ZIP_MAGIC = (b'PK\x03\x04', b'PK\x05\x06')  # A .npz is a zip archive (or an empty one).
_NPY_MAGIC = b'\x93NUMPY'


def load_npz(path: str) -> dict[str, np.ndarray]:
  """The arrays of a `.npz` file, {key: array} with its '/'-joined keys."""
  if not os.path.isfile(path):
    raise UserError(f'init_from: {path} is not a file; give the path of a .npz checkpoint.')
  try:
    with open(path, 'rb') as f:
      magic = f.read(len(_NPY_MAGIC))
  except OSError as e:
    raise UserError(f'init_from: {path} cannot be read ({e.strerror or e}).') from None
  if not (magic.startswith(_ZIP_MAGIC) or magic == _NPY_MAGIC):
    # np.load would take it for a pickle and talk about allow_pickle.
    raise UserError(
      f'init_from: {path} is not a readable .npz file (its first bytes are not those of a zip '
      'archive); give a .npz checkpoint (big_vision / ViT release layout).'
    )
  try:
    arrays = np.load(path, allow_pickle=False)
    if hasattr(arrays, 'files'):  # A .npy gives one array instead.
      with arrays:
        return {key: arrays[key] for key in arrays.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise UserError(
      f'init_from: {path} is not a readable .npz file ({type(e).__name__}: {_first_line(e)}); '
      'give a .npz checkpoint (big_vision / ViT release layout).'
    ) from None
  raise UserError(
    f'init_from: {path} holds a single array, not an .npz archive of named parameters; '
    'give a .npz checkpoint (big_vision / ViT release layout).'
  )


def _first_line(error: Exception) -> str:
  lines = str(error).strip().splitlines()
  return lines[0] if lines else ''


def _rename(rest: str, rules) -> str | None:
  for pattern, replacement in rules:
    if re.fullmatch(pattern, rest):
      return re.sub(pattern, replacement, rest)
  return None


def _strip_prefix(flat: Mapping[str, Any]) -> dict[str, Any]:
  for prefix in _PREFIXES:
    if f'{prefix}embedding/kernel' in flat:
      return {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
  return dict(flat)


def _convert_key(key: str, value, out: dict, name: str) -> None:
  """Puts one big_vision array into `out` under our name(s)."""
  unknown = UserError(
    f'{name}: unknown parameter {key!r}, not a ViT in the big_vision / ViT-release .npz '
    "layout (keys like 'Transformer/encoderblock_0/LayerNorm_0/scale'); give such a checkpoint."
  )
  if key in _TOP_LEVEL:
    out[_TOP_LEVEL[key]] = value
  elif match := re.fullmatch(r'Transformer/encoderblock_(\d+)/(.+)', key):
    ours = _rename(match.group(2), _BLOCK_RULES)
    if ours is None:
      raise unknown
    out[f'block_{int(match.group(1)):02d}/{ours}'] = value
  elif match := re.fullmatch(r'Transformer/encoderblock/(.+)', key):  # scan: (depth, ...).
    ours = _rename(match.group(1), _BLOCK_RULES)
    if ours is None:
      raise unknown
    for i in range(value.shape[0]):
      out[f'block_{i:02d}/{ours}'] = value[i]
  elif match := re.fullmatch(r'MAPHead_0/(.+)', key):
    ours = _rename(match.group(1), _MAP_HEAD_RULES)
    if ours is None:
      raise unknown
    out[f'map_head/{ours}'] = value
  else:
    raise unknown


def from_big_vision(
  flat: Mapping[str, Any], *, grid: tuple[int, int] | None = None, name: str = 'init_from'
) -> dict:
  """A ViT in big_vision / ViT-release names ({'a/b': array}) -> our nested params.

  Encoder blocks 'Transformer/encoderblock_{i}/...' (or big_vision's scanned
  'Transformer/encoderblock/...', stacked over depth) become block_{i:02d};
  big_vision's 'MAPHead_0' becomes 'map_head' (`vmoe_jax.models.heads.MapHead`).
  big_vision adds the position embeddings before it prepends the class token,
  so its pos_embedding has no class-token position: with a 'cls' and a
  pos_embedding of exactly the patch grid (`grid`, else a square number of
  positions), a zero row is put first, which leaves the function unchanged
  (our model adds pos_embedding after the class token). `name` labels errors.
  """
  flat = _strip_prefix(flat)
  if 'embedding/kernel' not in flat:
    raise UserError(
      f"{name}: no 'embedding/kernel' among its {len(flat)} arrays, not a ViT in the big_vision "
      '/ ViT-release .npz layout; give such a checkpoint.'
    )
  out: dict[str, Any] = {}
  for key, value in flat.items():
    _convert_key(key, np.asarray(value), out, name)
  pos = out.get('pos_embedding')
  if 'cls' in out and pos is not None and pos.ndim == 3:
    positions = pos.shape[1]
    patches = grid[0] * grid[1] if grid else math.isqrt(positions) ** 2
    if positions == patches:
      out['pos_embedding'] = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
  return unflatten(out)


def load_big_vision(path: str, *, grid: tuple[int, int] | None = None) -> dict:
  """`from_big_vision(load_npz(path))`: our nested params from a published ViT `.npz`."""
  return from_big_vision(load_npz(path), grid=grid, name=f'init_from: {path}')
