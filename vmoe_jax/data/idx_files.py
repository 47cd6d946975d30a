"""IDX files (the MNIST / Fashion-MNIST format), read with NumPy alone.

An IDX file is a 4-byte magic number -- two zero bytes, a type code and the
number of dimensions n -- then n big-endian uint32 sizes, then the data in
row-major order (LeCun et al., http://yann.lecun.com/exdb/mnist/). The
Fashion-MNIST files (Xiao et al. 2017) are uint8 images (N, 28, 28) and
uint8 labels (N,), usually gzip-compressed: Debian's `dataset-fashion-mnist`
installs them as `/usr/share/datasets/fashion-mnist/*-idx?-ubyte.gz`.

Every problem with a file (missing, truncated, wrong magic, sizes that do not
match) is a one-line `UserError` that names the file.
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np

from vmoe_jax.errors import UserError

# Type code -> dtype of the data (big-endian where it matters).
IDX_TYPES = {
  0x08: np.dtype(np.uint8),
  0x09: np.dtype(np.int8),
  0x0B: np.dtype('>i2'),
  0x0C: np.dtype('>i4'),
  0x0D: np.dtype('>f4'),
  0x0E: np.dtype('>f8'),
}
_CODES = {dtype: code for code, dtype in IDX_TYPES.items()}


def find(directory: str, stem: str) -> str | None:
  """`directory/stem` or `directory/stem.gz`, whichever exists (None if neither)."""
  for name in (stem, stem + '.gz'):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return path
  return None


def _read_bytes(path: str) -> bytes:
  try:
    if path.endswith('.gz'):
      with gzip.open(path, 'rb') as f:
        return f.read()
    with open(path, 'rb') as f:
      return f.read()
  except (OSError, EOFError, gzip.BadGzipFile) as e:
    raise UserError(
      f'IDX file {path} cannot be read ({type(e).__name__}: {e}); reinstall it '
      '(apt-get install --reinstall dataset-fashion-mnist) or point --config.input.data_dir '
      'at good copies.'
    ) from None


def parse(data: bytes, path: str = '<bytes>') -> np.ndarray:
  """The array held by the bytes of an IDX file."""
  bad = f'IDX file {path} is corrupt'
  fix = (
    'reinstall it (apt-get install --reinstall dataset-fashion-mnist) or point '
    '--config.input.data_dir at good copies.'
  )
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_TYPES:
    raise UserError(
      f'{bad}: magic number {data[:4].hex() or "(empty)"} is not an IDX header; {fix}'
    )
  dtype, ndim = IDX_TYPES[data[2]], data[3]
  header = 4 + 4 * ndim
  if ndim == 0 or len(data) < header:
    raise UserError(f'{bad}: its header for {ndim} dimensions is cut short; {fix}')
  shape = struct.unpack(f'>{ndim}I', data[4:header])
  expected = int(np.prod(shape)) * dtype.itemsize
  if len(data) - header != expected:
    raise UserError(
      f'{bad}: shape {shape} needs {expected:,} bytes of data, it holds {len(data) - header:,} '
      f'(truncated or padded); {fix}'
    )
  return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder('='))


def read(path: str) -> np.ndarray:
  """The array of the IDX file at `path` (gzip-compressed when it ends in .gz)."""
  return parse(_read_bytes(path), path)


def encode(array: np.ndarray) -> bytes:
  """The IDX bytes of `array` (for tests and for writing small datasets)."""
  array = np.asarray(array)
  dtype = array.dtype.newbyteorder('>') if array.dtype.itemsize > 1 else array.dtype
  code = _CODES.get(np.dtype(dtype))
  if code is None:
    raise ValueError(f'IDX has no type code for {array.dtype}.')
  header = bytes([0, 0, code, array.ndim]) + struct.pack(f'>{array.ndim}I', *array.shape)
  return header + array.astype(dtype).tobytes()


def write(path: str, array: np.ndarray) -> None:
  data = encode(array)
  if path.endswith('.gz'):
    with gzip.open(path, 'wb') as f:
      f.write(data)
  else:
    with open(path, 'wb') as f:
      f.write(data)
