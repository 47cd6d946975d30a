"""Numbers about where tokens go: kept assignments, expert load, class x expert counts.

Pure NumPy on the per-token routing that MoE layers sow (`vmoe_jax.moe.layer`,
`apply(..., mutable=['intermediates'])`), so that everything the routing
maps and the capacity sweep report can be tested without looking at images.

Axis letters: B images, T tokens per image, K selected experts per token,
E experts, L classes. A Routing holds (B, T, K) arrays: `expert_index`,
`slot` (-1: dropped for lack of capacity) and `combine_weight`.
"""

from __future__ import annotations

import numpy as np


def moe_routing(intermediates) -> dict[str, object]:
  """{'block_XX': Routing (B, T, K)} from the sown intermediates of a ViT, in block order."""
  out = {}
  for name in sorted(intermediates):
    moe = intermediates[name].get('moe') if hasattr(intermediates[name], 'get') else None
    if moe is not None and 'routing' in moe:
      out[name] = moe['routing'][0]
  return out


def kept_per_image(slot: np.ndarray) -> np.ndarray:
  """(token, choice) assignments that an expert processed, per image: (B, T, K) -> (B,)."""
  return np.sum(np.asarray(slot) >= 0, axis=(1, 2))


def expert_counts(
  expert_index: np.ndarray, slot: np.ndarray, num_experts: int, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Assignments per expert, all K choices: (chosen (E,), kept (E,)) int64.

  `chosen` counts what the router asked for (before capacity), `kept` what
  the expert processed. `mask` (B,) leaves out padding images (0).
  """
  expert_index, slot = np.asarray(expert_index), np.asarray(slot)
  weight = np.ones(expert_index.shape, np.int64)
  if mask is not None:
    weight = weight * (np.asarray(mask) > 0)[:, None, None]
  chosen = np.bincount(expert_index.ravel(), weight.ravel(), minlength=num_experts)
  kept = np.bincount(expert_index.ravel(), (weight * (slot >= 0)).ravel(), minlength=num_experts)
  return chosen.astype(np.int64), kept.astype(np.int64)


def class_expert_counts(
  first_expert: np.ndarray,
  labels: np.ndarray,
  num_classes: int,
  num_experts: int,
  mask: np.ndarray | None = None,
) -> np.ndarray:
  """Tokens of each class whose first choice is each expert: (B, T), (B,) -> (L, E) int64."""
  first_expert = np.asarray(first_expert)
  tokens = first_expert.shape[1]
  rows = np.repeat(np.asarray(labels), tokens)
  weight = np.ones(rows.shape, np.int64)
  if mask is not None:
    weight = np.repeat((np.asarray(mask) > 0).astype(np.int64), tokens)
  flat = rows * num_experts + first_expert.ravel()
  counts = np.bincount(flat, weight, minlength=num_classes * num_experts)
  return counts.astype(np.int64).reshape(num_classes, num_experts)


def row_shares(counts: np.ndarray) -> np.ndarray:
  """Rows divided by their sums (rows that sum to 0 stay 0): (L, E) -> (L, E) float."""
  counts = np.asarray(counts, np.float64)
  totals = counts.sum(axis=-1, keepdims=True)
  return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def patch_grid(
  expert_index: np.ndarray, slot: np.ndarray, grid: tuple[int, int], has_class_token: bool
) -> tuple[np.ndarray, np.ndarray]:
  """First-choice expert and 'skipped' flag of every patch of one image.

  Args:
    expert_index, slot: (T, K) of one image.
    grid: (rows, cols) of patches.
    has_class_token: token 0 is the class token (left out of the grid).

  Returns:
    (rows, cols) int expert of the first choice, and (rows, cols) bool, True
    where no expert processed the patch (every choice dropped): it only
    passed through the residual connection.
  """
  expert_index, slot = np.asarray(expert_index), np.asarray(slot)
  if has_class_token:
    expert_index, slot = expert_index[1:], slot[1:]
  rows, cols = grid
  if expert_index.shape[0] != rows * cols:
    raise ValueError(f'{expert_index.shape[0]} patch tokens do not fill a {rows}x{cols} grid.')
  skipped = np.all(slot < 0, axis=-1)
  return expert_index[:, 0].reshape(rows, cols), skipped.reshape(rows, cols)


class RoutingTally:
  """Accumulates routing statistics of one MoE layer over evaluation batches.

  `experts_choose`: the views are Expert Choice's (B, T, E), every token
  listing all E experts in the order of its gates, slot -1 where that expert
  did not take it. Then 'chosen' counts first choices only (each token's
  largest gate, one per token: the demand a top-1 router would see), 'kept'
  every taken (token, expert) pair, and shares are per token: the kept
  shares sum to the mean number of experts per token (up to E).
  """

  def __init__(self, num_experts: int, num_classes: int, experts_choose: bool = False):
    self.num_experts = num_experts
    self.experts_choose = experts_choose
    self.chosen = np.zeros(num_experts, np.int64)
    self.kept = np.zeros(num_experts, np.int64)
    self.class_expert = np.zeros((num_classes, num_experts), np.int64)
    self.assignments = 0  # Valid (token, choice) pairs seen; tokens with experts_choose.
    self.tokens = 0  # Valid tokens seen.
    self.skipped = 0  # Valid tokens that no expert processed.

  def add(self, routing, labels: np.ndarray, mask: np.ndarray) -> None:
    """Adds a batch: routing (B, T, K) arrays, labels (B,), mask (B,)."""
    expert_index, slot = np.asarray(routing.expert_index), np.asarray(routing.slot)
    chosen, kept = expert_counts(expert_index, slot, self.num_experts, mask)
    if self.experts_choose:
      chosen, _ = expert_counts(expert_index[..., :1], slot[..., :1], self.num_experts, mask)
    self.chosen += chosen
    self.kept += kept
    num_classes = self.class_expert.shape[0]
    self.class_expert += class_expert_counts(
      expert_index[..., 0], labels, num_classes, self.num_experts, mask
    )
    real = np.asarray(mask) > 0
    choices = 1 if self.experts_choose else expert_index.shape[2]
    self.assignments += int(np.sum(real)) * expert_index.shape[1] * choices
    self.tokens += int(np.sum(real)) * expert_index.shape[1]
    self.skipped += int(np.sum(np.all(slot < 0, axis=-1)[real]))

  def summary(self) -> dict[str, object]:
    """Shares of all assignments (per token with experts_choose): kept, chosen and kept
    per expert; and the share of tokens that no expert processed."""
    total = max(self.assignments, 1)
    return {
      'kept_share': float(self.kept.sum() / total),
      'skipped_token_share': float(self.skipped / max(self.tokens, 1)),
      'expert_chosen_share': (self.chosen / total).tolist(),
      'expert_kept_share': (self.kept / total).tolist(),
    }
