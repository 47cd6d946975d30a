"""Resizing the patch grid of a position embedding (fine-tuning at another resolution).

`resize_grid` interpolates a (R, C, D) grid bilinearly with the corners
aligned (the first and last rows/columns of the source grid land on those of
the target; `scipy.ndimage.zoom(order=1)`, what big_vision and the ViT
release use); `resize_pos_embedding` does it for a (1, tokens + R*C, D)
pos_embedding, class-token position included. `grid_of` finds (or checks)
the patch grid of a pos_embedding. Used by `vmoe_jax.transfer.mapping.init_params`.
"""

from __future__ import annotations

import math

import numpy as np

from vmoe_jax.errors import UserError


def _interpolation_matrix(size_out: int, size_in: int) -> np.ndarray:
  """(size_out, size_in) linear interpolation weights with the end points aligned.

  Output i samples the input at i * (size_in - 1) / (size_out - 1); a single
  output samples the middle.
  """
  if size_out == 1:
    positions = np.array([(size_in - 1) / 2])
  else:
    positions = np.arange(size_out) * (size_in - 1) / (size_out - 1)
  low = np.clip(np.floor(positions).astype(int), 0, max(size_in - 2, 0))
  frac = positions - low
  weights = np.zeros((size_out, size_in))
  rows = np.arange(size_out)
  np.add.at(weights, (rows, low), 1 - frac)
  if size_in > 1:
    np.add.at(weights, (rows, low + 1), frac)
  return weights


def resize_grid(grid, target_grid: tuple[int, int]) -> np.ndarray:
  """(R, C, D) -> (R', C', D) float32 by bilinear interpolation with the corners aligned."""
  grid = np.asarray(grid, np.float64)
  rows = _interpolation_matrix(target_grid[0], grid.shape[0])
  cols = _interpolation_matrix(target_grid[1], grid.shape[1])
  return np.einsum('ri,cj,ijd->rcd', rows, cols, grid).astype(np.float32)


def grid_of(name: str, grid, patches: int, shape) -> tuple[int, int]:
  """The (rows, cols) of `patches` positions: `grid` checked, or a square."""
  if grid is None:
    side = math.isqrt(patches)
    if side * side != patches:
      raise UserError(
        f'pos_embedding: the {name} has {patches} patch positions {shape}, not a square grid; '
        f'pass {name}_grid=(rows, cols).'
      )
    return side, side
  rows, cols = (int(n) for n in grid)
  if rows * cols != patches:
    raise UserError(
      f'{name}_grid=({rows}, {cols}) has {rows * cols} positions but the {name} pos_embedding '
      f'{shape} has {patches} patch positions; pass the patch grid of the {name} model '
      '(image size / patch size).'
    )
  return rows, cols


def resize_pos_embedding(
  pos, source_grid, target_grid, *, source_tokens: int, target_tokens: int
) -> np.ndarray:
  """(1, source_tokens + R*C, D) -> (1, target_tokens + R'*C', D) float32.

  The grid part is row-major and resized by `resize_grid`. The class-token
  position (`source_tokens` = 1) is kept as it is when the target has one,
  dropped when it has none; a target token without a source one gets zeros.
  """
  pos = np.asarray(pos, np.float32)
  width = pos.shape[-1]
  grid = pos[0, source_tokens:].reshape(*source_grid, width)
  resized = resize_grid(grid, target_grid).reshape(1, -1, width)
  tokens = pos[:, :source_tokens][:, :target_tokens]
  if tokens.shape[1] < target_tokens:
    tokens = np.zeros((1, target_tokens, width), np.float32)
  return np.concatenate([tokens, resized], axis=1)
