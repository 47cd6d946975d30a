"""Checksums of checkpointed arrays and the check that what was read is what was saved.

Checksums (`array_checksums`) are computed on the devices that hold the
arrays, by one jitted pass over the whole tree: each array is read as
unsigned 32-bit words w_i (float32 / int32 bitcast; 16- and 8-bit types
bitcast and widened; 64-bit types as two words; PRNG keys by their key data)
and summed twice modulo 2^32: sum_i w_i * (2i + 1), whose odd multipliers
make any single-bit flip change it, and sum_i g(w_i) * m_i with the
bijection g(w) = w ^ (w >> 16) and pseudo-random odd m_i = (i * 0x9E3779B1 +
0x7F4A7C15) | 1, so that other changes are unlikely to cancel in both. i is
the element's index in the flattened global array and the sums are exact
integer sums, so the result is the same on any mesh, any number of
processes, sharded or not. The same pass counts the non-finite elements of
float arrays.

`verify` compares the checksums of the arrays read from a checkpoint with
those saved in its meta (`checkpointing.save` writes them) and refuses, as a
one-line `CorruptCheckpointError` naming the checkpoint and the array, an
array that does not match or holds non-finite values.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from vmoe_jax.errors import UserError

log = logging.getLogger(__name__)

CHECKSUMS_KEY = 'checksums'
CHECKSUM_VERSION_KEY = 'checksum_version'
CHECKSUM_VERSION = 1


class CorruptCheckpointError(UserError):
  """A checkpoint whose bytes cannot be read or do not match its checksums."""

  def __init__(self, problem: str, fix: str):
    self.problem = problem  # 'checkpoint DIR is corrupt: ...', without the fix.
    super().__init__(f'{problem}; {fix}.')


_GOLDEN = 0x9E3779B1  # Odd: i -> i * _GOLDEN + _OFFSET is a bijection modulo 2^32.
_OFFSET = 0x7F4A7C15


def _words(x: jax.Array) -> jax.Array:
  """The bits of `x` as uint32 words (64-bit and complex elements: trailing axes)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    x = jnp.stack([x.real, x.imag], axis=-1)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
  """Row-major index of every element of the global array, modulo 2^32."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
    stride *= shape[axis]
  return index


def _nonfinite(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """1 per non-finite element of a float `x`, laid out like its words (`shape`)."""
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros(shape, jnp.uint32)
  bad = (~jnp.isfinite(x)).astype(jnp.uint32)
  extra = len(shape) - x.ndim  # Words per element beyond the first: count it once.
  if extra:
    first = sum(lax.broadcasted_iota(jnp.uint32, shape, x.ndim + k) for k in range(extra)) == 0
    bad = bad.reshape(x.shape + (1,) * extra) * first.astype(jnp.uint32)
  return bad


def _leaf_sums(x: jax.Array) -> jax.Array:
  """[weighted sum, mixed sum, non-finite count] of one array, as uint32.

  One variadic reduction per array (three separate ones compile twice as
  slowly, and a checkpoint holds hundreds of arrays).
  """
  words = _words(x)
  index = _flat_index(words.shape)
  weighted = words * (index * jnp.uint32(2) + jnp.uint32(1))
  odd = (index * jnp.uint32(_GOLDEN) + jnp.uint32(_OFFSET)) | jnp.uint32(1)
  mixed = (words ^ (words >> 16)) * odd
  terms = (weighted, mixed, _nonfinite(x, words.shape))
  zero = jnp.uint32(0)
  sums = lax.reduce(
    terms,
    (zero, zero, zero),
    lambda a, b: tuple(p + q for p, q in zip(a, b)),
    tuple(range(words.ndim)),
  )
  return jnp.stack(sums)


def _tree_sums(leaves: list[jax.Array]) -> jax.Array:
  return jnp.stack([_leaf_sums(x) for x in leaves])


@functools.lru_cache(maxsize=16)
def _jitted_sums(out_sharding):
  return jax.jit(_tree_sums, out_shardings=out_sharding)


def _replicated_sharding(leaves: list[Any]):
  """Replicated on the mesh of the first sharded leaf: readable on every process."""
  for leaf in leaves:
    sharding = getattr(leaf, 'sharding', None)
    if isinstance(sharding, NamedSharding):
      return NamedSharding(sharding.mesh, PartitionSpec())
  return None


def path_names(path) -> tuple[str, ...]:
  """Key path -> names, the same for dict keys, attributes and indices."""
  names = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
    else:
      names.append(str(key))
  return tuple(names)


def array_names(tree: Any) -> list[str]:
  """The '/'-joined path of every leaf of `tree`, in leaf order."""
  return ['/'.join(path_names(p)) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def array_checksums(tree: Any) -> tuple[dict[str, str], dict[str, int]]:
  """(checksums as 16 hex digits, non-finite counts) of every array, by '/'-joined path.

  One jitted pass on the devices that hold the arrays (see the module
  docstring); only the results (3 words per array) come to the host. Every
  process gets the same answer.
  """
  names = array_names(tree)
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return {}, {}
  sums = np.asarray(jax.device_get(_jitted_sums(_replicated_sharding(leaves))(leaves)))
  checksums = {n: f'{int(s[0]):08x}{int(s[1]):08x}' for n, s in zip(names, sums)}
  return checksums, {n: int(s[2]) for n, s in zip(names, sums)}


def first_and_more(names: list[str]) -> str:
  more = len(names) - 1
  return f' (and {more} other array{"s" if more > 1 else ""})' if more else ''


def verify(where: str, tree: Any, meta: dict, fix: str) -> None:
  """Raises CorruptCheckpointError if `tree`, read from checkpoint `where`, is not as saved.

  Compares the checksums of the arrays of `tree` (all or some of the saved
  ones) with those in `meta`, and refuses non-finite float values.
  """
  checksums, nonfinite = array_checksums(tree)
  saved = meta.get(CHECKSUMS_KEY)
  if saved is None or meta.get(CHECKSUM_VERSION_KEY) != CHECKSUM_VERSION:
    log.warning(
      'checkpoint %s has no checksums (written by an earlier vmoe_jax); it cannot be verified.',
      where,
    )
  else:
    bad = [name for name, value in checksums.items() if saved.get(name) != value]
    if bad:
      name = bad[0]
      raise CorruptCheckpointError(
        f'checkpoint {where} is corrupt: {name} does not match its checksum (saved '
        f'{saved.get(name, "none")}, read {checksums[name]}){first_and_more(bad)}',
        fix,
      )
  bad = [name for name, count in nonfinite.items() if count]
  if bad:
    name = bad[0]
    raise CorruptCheckpointError(
      f'checkpoint {where} is corrupt: {name} holds {nonfinite[name]} non-finite values'
      f'{first_and_more(bad)}',
      fix,
    )


def itemsize(dtype) -> int:
  """Bytes per element of `dtype` (8 for typed PRNG keys, which numpy does not know)."""
  try:
    return np.dtype(dtype).itemsize
  except TypeError:
    return 8
