"""A target model's parameters from a source checkpoint's: fine-tuning, resizing, upcycling.

Parameters are nested dicts of arrays; a path joins the keys with '/'
('block_01/moe/wi'). Shapes: D width, H MLP width, E experts, L classes,
T tokens, (R, C) the patch grid (rows, cols), p patch size.

`init_params(source, target, ...)` walks the target's parameters and, for
each path, in this order:
  1. in `keep_fresh` (path prefixes): 'fresh', the target's initial value.
  2. head/*: 'loaded' if the source has the same shape, else 'fresh' and
     ZERO (the kernel and the bias), as big_vision fine-tunes.
  3. pos_embedding (1, T, D): 'loaded' if the shapes and grids agree, else
     'resized': the patch grid (R, C) is interpolated bilinearly with the
     corners aligned (the first and last rows/columns of the source grid land
     on those of the target; `scipy.ndimage.zoom(order=1)`, what big_vision
     and the ViT release use; `vmoe_jax.transfer.pos_resize`), the class-token
     position copied as it is.
  4. block_XX/moe/* where the source's block_XX has a dense mlp: sparse
     upcycling (Komatsuzaki et al. 2022, "Sparse Upcycling"): every expert e
     gets wi[e] = Dense_0/kernel, bi[e] = Dense_0/bias, wo[e] = Dense_1/kernel,
     bo[e] = Dense_1/bias ('upcycled'); the router (and any other MoE-only
     parameter) is 'fresh'. With `upcycle_noise_std` s > 0 each copy gets
     w + s * std(w) * N(0, 1), the noise relative to the std of that source
     array (kernels and biases alike) and drawn independently per expert
     (NumPy's generator seeded by `rng` and the path).
  5. block_XX/mlp/* where the source's block_XX is an MoE: `moe_to_dense`
     decides: 'error' (the default), 'fresh' (keep the target's init) or
     'expert_mean' (the mean over experts of wi, bi, wo, bo: 'averaged').
  6. map_head/* absent from the source: 'fresh' (a new MAP head).
  7. anything else: 'loaded' when the source has the path with the same
     shape; a different shape is a UserError naming both shapes (MoE -> MoE
     with another number of experts included); a path the source lacks is a
     UserError listing the first few.
Values keep the target's dtype. What is computed (resized, upcycled,
averaged, zero heads) is computed on the host with NumPy and returned as
NumPy arrays (those sources must be fully addressable); loaded arrays are
passed through as they are.

Source paths that nothing read are reported 'unused'. That is fine for whole
parts the target does not have (a deeper source's extra blocks, 'cls' into
a 'gap' model, a pre_logits layer) and a UserError for a parameter of a
block that the target has (the blocks would differ in structure), except
what `moe_to_dense` or `keep_fresh` drop on purpose. `lenient=True` turns
every "cannot map" / "lacks" error into 'fresh' (used by
`vmoe_jax.transfer.distill.student_from_teacher`: copy what has the same path and
shape).

`vmoe_jax.transfer.npz_loader` reads ViTs published as `.npz` (the ViT / AugReg
release and big_vision) into our names.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from vmoe_jax.errors import UserError
from vmoe_jax.transfer.pos_resize import grid_of
from vmoe_jax.transfer.pos_resize import resize_pos_embedding

ACTIONS = ('loaded', 'resized', 'upcycled', 'averaged', 'fresh', 'unused')
MOE_TO_DENSE = ('error', 'fresh', 'expert_mean')
# Expert parameter <- dense MLP parameter of the same block.
MOE_FROM_MLP = {
  'wi': 'Dense_0/kernel',
  'bi': 'Dense_0/bias',
  'wo': 'Dense_1/kernel',
  'bo': 'Dense_1/bias',
}
MLP_FROM_MOE = {v: k for k, v in MOE_FROM_MLP.items()}
_BLOCK = re.compile(r'(block_\d+)/(mlp|moe)/(.+)')
_MAX_LISTED = 6


@dataclasses.dataclass(frozen=True)
class Entry:
  """What happened to one parameter.

  path: the target path ('unused': the source path). action: one of ACTIONS.
  source: the source path read (None for 'fresh'). from_shape / to_shape:
  the source's and the target's shapes. note: a few words, e.g. 'zeros'.
  """

  path: str
  action: str
  source: str | None = None
  from_shape: tuple[int, ...] | None = None
  to_shape: tuple[int, ...] | None = None
  note: str = ''


Report = list[Entry]


# --------------------------------------------------------------------------- trees


def flatten(tree: Mapping, prefix: str = '') -> dict[str, Any]:
  """Nested dicts -> {'a/b/c': leaf}; flax boxes (nn.Partitioned) stay leaves."""
  flat = {}
  for key, value in tree.items():
    path = f'{prefix}{key}'
    if isinstance(value, Mapping):
      flat.update(flatten(value, path + '/'))
    else:
      flat[path] = value
  return flat


def unflatten(flat: Mapping[str, Any]) -> dict:
  """{'a/b/c': leaf} -> nested dicts."""
  tree: dict = {}
  for path, value in flat.items():
    *parents, name = path.split('/')
    node = tree
    for key in parents:
      node = node.setdefault(key, {})
    node[name] = value
  return tree


def _unbox(x):
  return x.unbox() if isinstance(x, nn.meta.AxisMetadata) else x


def _shape(x) -> tuple[int, ...]:
  return tuple(int(n) for n in x.shape)


def _cast(x, like):
  return x if x.dtype == like.dtype else x.astype(like.dtype)


# --------------------------------------------------------------------------- mapping


@dataclasses.dataclass
class _Mapper:
  """State of one `init_params` walk: the flat trees and what was read."""

  source: dict[str, Any]
  target: dict[str, Any]
  source_grid: Any
  target_grid: Any
  noise_std: float
  rng: Any
  moe_to_dense: str
  keep_fresh: tuple[str, ...]
  lenient: bool
  used: set = dataclasses.field(default_factory=set)
  dropped: set = dataclasses.field(default_factory=set)  # Unused on purpose.
  missing: list = dataclasses.field(default_factory=list)
  mismatched: list = dataclasses.field(default_factory=list)  # One-line messages.
  report: list = dataclasses.field(default_factory=list)

  def entry(self, path, action, source=None, note=''):
    from_shape = _shape(self.source[source]) if source in self.source else None
    self.report.append(Entry(path, action, source, from_shape, _shape(self.target[path]), note))

  def fresh(self, path, note=''):
    self.entry(path, 'fresh', note=note)
    return self.target[path]

  def mismatch(self, path, message):
    """A target parameter whose source has another shape: fresh, or an error at the end."""
    if self.lenient:
      return self.fresh(path, message.split('; ')[0])
    self.mismatched.append((path, message))
    return self.target[path]

  def load(self, path, source_path=None):
    """Rule 7: the same path (or `source_path`) with the same shape."""
    source_path = source_path or path
    if source_path not in self.source:
      if self.lenient:
        return self.fresh(path, 'not in the source')
      self.missing.append(path)
      return self.target[path]
    value, target = self.source[source_path], self.target[path]
    self.used.add(source_path)
    if _shape(value) != _shape(target):
      return self.mismatch(path, _mismatch(path, _shape(value), _shape(target)))
    self.entry(path, 'loaded', source_path)
    return _cast(value, target)


def _mismatch(path: str, source_shape, target_shape) -> str:
  """The one-line message for a parameter whose shapes differ."""
  head = f'cannot map {path}: the source has shape {source_shape}, the target {target_shape}; '
  match = _BLOCK.fullmatch(path)
  if match and match.group(2) == 'moe':
    axis = -1 if match.group(3) == 'router' else 0
    experts = source_shape[axis] if source_shape else None
    if source_shape and len(source_shape) == len(target_shape) and experts != target_shape[axis]:
      return head + (
        f'use a target with {experts} experts (--config.model.moe.num_experts={experts}) '
        'or a source that matches'
      )
    return head + (
      "use a target with the source's width and expert MLP width (--config.model.width, "
      '--config.model.moe.mlp_dim) or a source that matches'
    )
  if path == 'embedding/kernel' and source_shape[:2] != target_shape[:2]:
    return head + f'use --config.model.patch_size={source_shape[0]} or a source that matches'
  return head + (
    "use a target with the source's architecture (--config.model.width, num_heads, mlp_dim, "
    'patch_size, stem) or a source that matches'
  )


def _head(mapper: _Mapper, path: str):
  """Rule 2: the classifier head; zeros when the classes (or anything) differ."""
  target = mapper.target[path]
  if path in mapper.source and _shape(mapper.source[path]) == _shape(target):
    return mapper.load(path)
  note = 'zeros'
  if path in mapper.source:
    note = f'zeros; the source has {_shape(mapper.source[path])}'
  mapper.used.add(path)
  mapper.entry(path, 'fresh', note=note)
  return np.zeros(target.shape, target.dtype)


def _pos_embedding(mapper: _Mapper, path: str):
  """Rule 3: the position embeddings, resized when the patch grid differs."""
  if path not in mapper.source:
    return mapper.load(path)
  value, target = mapper.source[path], mapper.target[path]
  source_shape, target_shape = _shape(value), _shape(target)
  if len(source_shape) != 3 or source_shape[-1] != target_shape[-1]:
    mapper.used.add(path)
    return mapper.mismatch(path, _mismatch(path, source_shape, target_shape))
  source_tokens, target_tokens = int('cls' in mapper.source), int('cls' in mapper.target)
  source_grid = grid_of('source', mapper.source_grid, source_shape[1] - source_tokens, source_shape)
  target_grid = grid_of('target', mapper.target_grid, target_shape[1] - target_tokens, target_shape)
  if source_shape == target_shape and source_grid == target_grid:
    return mapper.load(path)
  mapper.used.add(path)
  resized = resize_pos_embedding(
    value, source_grid, target_grid, source_tokens=source_tokens, target_tokens=target_tokens
  )
  note = f'grid {source_grid} -> {target_grid}, bilinear, corners aligned'
  mapper.entry(path, 'resized', path, note=note)
  return _cast(resized, target)


def _noise(rng, path: str, shape) -> np.ndarray:
  """N(0, 1) float32 noise of `shape` for `path`, a function of `rng` and the path.

  NumPy's generator seeded with the key's bits and a hash of the path: no
  XLA compilation per shape, and each path gets its own stream.
  """
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  words = [int(w) for w in np.asarray(rng, np.uint32).ravel()]
  generator = np.random.default_rng([*words, zlib.crc32(path.encode())])
  return generator.standard_normal(shape, dtype=np.float32)


def _upcycle(mapper: _Mapper, path: str, block: str, name: str):
  """Rule 4: an expert parameter from the dense MLP of the same source block."""
  if name not in MOE_FROM_MLP:
    return mapper.fresh(path, 'new MoE parameter (upcycling)')
  source_path = f'{block}/mlp/{MOE_FROM_MLP[name]}'
  if source_path not in mapper.source:
    return mapper.load(path, source_path)
  value, target = mapper.source[source_path], mapper.target[path]
  mapper.used.add(source_path)
  if _shape(value) != _shape(target)[1:]:
    return mapper.mismatch(
      path,
      f'cannot upcycle {source_path} into {path}: the source has shape {_shape(value)}, each '
      f"target expert {_shape(target)[1:]}; use a target with the source's width and MLP width "
      '(--config.model.width, --config.model.moe.mlp_dim) or a source that matches',
    )
  value = np.asarray(value, np.float32)
  experts = np.broadcast_to(value, _shape(target))
  note = 'copied into every expert'
  if mapper.noise_std > 0:
    experts = experts + mapper.noise_std * value.std() * _noise(mapper.rng, path, experts.shape)
    note += f', noise {mapper.noise_std} x std'
  mapper.entry(path, 'upcycled', source_path, note=note)
  return np.array(experts, dtype=target.dtype)  # A copy: the broadcast is a view.


def _dense_from_moe(mapper: _Mapper, path: str, block: str, name: str):
  """Rule 5: a dense MLP parameter of a block that is an MoE in the source."""
  mapper.dropped.update(p for p in mapper.source if p.startswith(f'{block}/moe/'))
  if mapper.moe_to_dense == 'error':
    index = int(block.split('_')[1])
    raise UserError(
      f'cannot map {block}/moe into the dense {block}/mlp: the source block is an MoE, the '
      f"target's is dense; make block {index} an MoE layer of the target "
      '(--config.model.moe.layers), or distil the MoE into a dense student (config.distill)'
    )
  if mapper.moe_to_dense == 'fresh' or name not in MLP_FROM_MOE:
    return mapper.fresh(path, 'the source block is an MoE')
  source_path = f'{block}/moe/{MLP_FROM_MOE[name]}'
  if source_path not in mapper.source:
    return mapper.load(path, source_path)
  value, target = mapper.source[source_path], mapper.target[path]
  mapper.used.add(source_path)
  if _shape(value)[1:] != _shape(target):
    return mapper.mismatch(
      path,
      f'cannot average {source_path} into {path}: the source has shape {_shape(value)}, the '
      f"target {_shape(target)}; use a target with the source's width and MLP width "
      '(--config.model.width, --config.model.mlp_dim) or a source that matches',
    )
  mean = np.asarray(value, np.float32).mean(axis=0)
  mapper.entry(path, 'averaged', source_path, note=f'mean of {_shape(value)[0]} experts')
  return _cast(mean, target)


def _map_one(mapper: _Mapper, path: str):
  """The value of one target parameter (rules 1-7 of the module docstring)."""
  if any(path.startswith(prefix) for prefix in mapper.keep_fresh):
    return mapper.fresh(path, 'keep_fresh')
  if path.startswith('head/'):
    return _head(mapper, path)
  if path == 'pos_embedding':
    return _pos_embedding(mapper, path)
  match = _BLOCK.fullmatch(path)
  if match and path not in mapper.source:
    block, kind, name = match.groups()
    other = 'mlp' if kind == 'moe' else 'moe'
    if any(p.startswith(f'{block}/{other}/') for p in mapper.source):
      if kind == 'moe':
        return _upcycle(mapper, path, block, name)
      return _dense_from_moe(mapper, path, block, name)
  if path.startswith('map_head/') and path not in mapper.source:
    return mapper.fresh(path, 'new MAP head')
  return mapper.load(path)


def _block_of(path: str) -> str | None:
  match = re.match(r'(block_\d+)/', path)
  return match.group(1) if match else None


def _check_unused(mapper: _Mapper) -> None:
  """Report unused source paths; a UserError for those of a block the target has."""
  target_blocks = {_block_of(p) for p in mapper.target} - {None}
  unused = [p for p in mapper.source if p not in mapper.used]
  for path in unused:
    mapper.report.append(Entry(path, 'unused', path, _shape(mapper.source[path])))
  kept = lambda path: path in mapper.dropped or any(path.startswith(k) for k in mapper.keep_fresh)
  stray = [
    source_path
    for source_path in unused
    if _block_of(source_path) in target_blocks and not kept(source_path) and not mapper.lenient
  ]
  if stray:
    block = _block_of(stray[0])
    raise UserError(
      f"source parameters {_listing(stray)} have no place in the target's {block}: the blocks "
      'differ in structure; use a target built like the source (--config.model.*)'
    )


def _listing(paths: Sequence[str]) -> str:
  shown = ', '.join(paths[:_MAX_LISTED])
  more = len(paths) - _MAX_LISTED
  return f'{shown}, ... ({more} more)' if more > 0 else shown


def init_params(
  source: Mapping,
  target: Mapping,
  *,
  source_grid: tuple[int, int] | None = None,
  target_grid: tuple[int, int] | None = None,
  upcycle_noise_std: float = 0.0,
  rng: jax.Array | None = None,
  moe_to_dense: str = 'error',
  keep_fresh: Sequence[str] = (),
  lenient: bool = False,
) -> tuple[dict, Report]:
  """The target's parameters, mapped from the source's (rules in the module docstring).

  Args:
    source: restored source parameters (nested dicts, no 'params' level).
    target: the target model's freshly initialised parameters; flax boxes
      (nn.Partitioned) are kept around the new values.
    source_grid, target_grid: patch grids (rows, cols) of the two models,
      needed to resize pos_embedding when the grid is not square.
    upcycle_noise_std: noise on upcycled experts, relative to each source
      array's std (0: exact copies). Needs `rng`.
    rng: PRNG key of that noise.
    moe_to_dense: 'error', 'fresh' or 'expert_mean' for a source MoE block
      whose target block is dense.
    keep_fresh: path prefixes kept from the target's init.
    lenient: missing or mismatched parameters become 'fresh' instead of errors.

  Returns:
    (params, report): params a nested dict like `target`; report one Entry
    per target path plus the 'unused' source paths (see `format_report`).
  """
  if moe_to_dense not in MOE_TO_DENSE:
    raise UserError(f'moe_to_dense={moe_to_dense!r} is unknown; use one of {MOE_TO_DENSE}.')
  if upcycle_noise_std < 0 or (upcycle_noise_std > 0 and rng is None):
    raise UserError(
      f'upcycle_noise_std={upcycle_noise_std} needs to be >= 0, and an rng key when > 0; '
      'pass rng=jax.random.key(seed) or set the noise to 0.'
    )
  boxed = flatten(target)
  mapper = _Mapper(
    source={p: _unbox(v) for p, v in flatten(source).items()},
    target={p: _unbox(v) for p, v in boxed.items()},
    source_grid=source_grid,
    target_grid=target_grid,
    noise_std=float(upcycle_noise_std),
    rng=rng,
    moe_to_dense=moe_to_dense,
    keep_fresh=tuple(keep_fresh),
    lenient=lenient,
  )
  values = {path: _map_one(mapper, path) for path in mapper.target}
  if mapper.mismatched:
    # The most telling mismatch: the patch embedding, then the experts, then kernels.
    rank = lambda path: (path != 'embedding/kernel', not path.endswith('/wi'), 'kernel' not in path)
    raise UserError(min(mapper.mismatched, key=lambda item: rank(item[0]))[1])
  if mapper.missing:
    raise UserError(
      f"the source lacks {len(mapper.missing)} of the target's parameters "
      f'({_listing(mapper.missing)}); use a source with the same architecture, or keep them '
      'fresh (keep_fresh)'
    )
  _check_unused(mapper)
  out = {
    p: boxed[p].replace_boxed(v) if isinstance(boxed[p], nn.meta.AxisMetadata) else v
    for p, v in values.items()
  }
  return unflatten(out), mapper.report


def format_report(report: Report, prefix: str = 'init_from') -> str:
  """One log line: counts per action; resized, fresh and unused paths named.

  e.g. 'init_from: 38 loaded, 1 resized (pos_embedding (1, 50, 128) -> (1, 17, 128)),
  8 upcycled, 3 fresh (head/kernel, head/bias, block_01/moe/router)'.
  """
  parts = []
  for action in ACTIONS:
    entries = [entry for entry in report if entry.action == action]
    if not entries and action != 'loaded':
      continue
    part = f'{len(entries)} {action}'
    if action == 'resized':
      part += ' (' + ', '.join(f'{e.path} {e.from_shape} -> {e.to_shape}' for e in entries) + ')'
    elif action in ('fresh', 'unused'):
      part += f' ({_listing([e.path for e in entries])})'
    parts.append(part)
  return f'{prefix}: ' + ', '.join(parts)
