"""Figures of routing: accuracy against compute, expert load, class x expert, examples.

Plots only: the numbers come from `vmoe_jax.evaluation.routing_stats` and
`vmoe_jax.evaluate` and are tested there. Every function writes one PNG with
matplotlib's Agg canvas (no display, no pyplot state).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib import colors as mcolors
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.patches import Rectangle


def _save(figure: Figure, path: str) -> str:
  FigureCanvasAgg(figure)
  figure.savefig(path, dpi=120, bbox_inches='tight')
  return path


def expert_colors(num_experts: int) -> mcolors.ListedColormap:
  """A categorical colour per expert (tab10 / tab20, else evenly spaced hues)."""
  if num_experts <= 10:
    palette = colormaps['tab10'].colors[:num_experts]
  elif num_experts <= 20:
    palette = colormaps['tab20'].colors[:num_experts]
  else:
    palette = colormaps['hsv'](np.linspace(0, 1, num_experts, endpoint=False))
  return mcolors.ListedColormap(palette, name='experts')


def flops_unit(values: Sequence[float]) -> tuple[str, float]:
  """('GFLOPs', 1e9) or a smaller unit so that the largest value is >= 1."""
  largest = max([abs(v) for v in values] + [0.0])
  for name, scale in (('GFLOPs', 1e9), ('MFLOPs', 1e6), ('kFLOPs', 1e3)):
    if largest >= scale:
      return name, scale
  return 'FLOPs', 1.0


# The least span of the accuracy axis, in points: a sweep that moves by a
# test image or two is drawn as nearly flat, not as a cliff.
MIN_ACCURACY_SPAN = 2.0


def accuracy_limits(values: Sequence[float], min_span: float = MIN_ACCURACY_SPAN):
  """(low, high) of the accuracy axis (%): the values with a margin, at least `min_span` wide."""
  low, high = min(values), max(values)
  margin = max(0.15 * (high - low), 0.5 * max(0.0, min_span - (high - low)))
  return max(0.0, low - margin), min(100.0, high + margin)


def plot_accuracy_vs_compute(
  rows: Sequence[Mapping],
  path: str,
  full_expert_flops: float | None = None,
  title: str = '',
  num_test: int | None = None,
) -> str:
  """Test accuracy against expert FLOPs per image, one line for vanilla and one for BPR.

  The accuracy axis spans at least `MIN_ACCURACY_SPAN` points (so that a test
  image or two do not fill it; `num_test` adds what one test image is worth
  to its label), the capacity factors are the ticks of a top axis (not labels
  beside the points, which collided) and the legend sits under the axes, off
  the points.

  Args:
    rows: settings of the capacity sweep, each with 'capacity_factor',
      'batch_priority', 'accuracy' and 'expert_flops_per_image'.
    path: the PNG to write.
    full_expert_flops: expert FLOPs per image when no token is dropped (a
      dashed vertical line).
    title: figure title.
    num_test: test images behind each accuracy, if known.
  """
  unit, scale = flops_unit([r['expert_flops_per_image'] for r in rows])
  figure = Figure(figsize=(6.4, 4.8), layout='constrained')
  ax = figure.add_subplot()
  low, high = accuracy_limits([100 * r['accuracy'] for r in rows])
  ax.set_ylim(low, high)
  x_all = [r['expert_flops_per_image'] / scale for r in rows]
  span = (max(x_all) - min(x_all)) or 1.0
  ticks = {}  # Capacity factor -> x, for the top axis (vanilla's compute; BPR's is close).
  for bpr, label, marker in ((False, 'vanilla routing', 'o'), (True, 'BPR', 's')):
    line = sorted(
      (r for r in rows if r['batch_priority'] == bpr), key=lambda r: r['capacity_factor']
    )
    if not line:
      continue
    x = [r['expert_flops_per_image'] / scale for r in line]
    y = [100 * r['accuracy'] for r in line]
    ax.plot(x, y, marker=marker, label=label, alpha=0.85)
    for r, xi in zip(line, x):
      ticks.setdefault(r['capacity_factor'], xi)
  # C on a top axis rather than beside the points, where labels collided with the other line.
  shown, last = [], None
  for factor, xi in sorted(ticks.items(), key=lambda item: item[1]):
    if last is None or xi - last >= 0.07 * span:  # Close ticks: capacity no longer binds.
      shown.append((factor, xi))
      last = xi
  top = ax.secondary_xaxis('top')
  top.set_xticks([xi for _, xi in shown], labels=[f'{factor:g}' for factor, _ in shown])
  top.set_xlabel('eval capacity factor C', size=8)
  top.tick_params(labelsize=8)
  if full_expert_flops:
    ax.axvline(full_expert_flops / scale, color='gray', ls='--', lw=1, label='no token dropped')
  ax.set_xlabel(f'expert {unit} per image (kept assignments)')
  ylabel = 'test accuracy (%)'
  if num_test:
    ylabel += f'; 1 test image = {100 / num_test:.2g} points'
  ax.set_ylabel(ylabel)
  ax.set_title(title or 'Accuracy against expert compute (eval capacity factor C)', size=10)
  ax.grid(alpha=0.3)
  figure.legend(loc='outside lower center', ncol=3, fontsize=8)
  return _save(figure, path)


def plot_expert_load(
  layers: Mapping[str, Mapping],
  path: str,
  num_experts: int,
  capacity_factor: float | None = None,
  title: str = '',
  experts_choose: bool = False,
) -> str:
  """Per MoE layer, bars of the share of assignments each expert was chosen for and kept.

  Args:
    layers: {'block_XX': {'expert_chosen_share': (E,), 'expert_kept_share': (E,)}}
      (shares of all assignments of the layer).
    path: the PNG to write.
    num_experts: E (the dashed line is the balanced share 1/E).
    capacity_factor: C of the kept shares: the dotted line is the capacity of
      an expert as a share of the assignments, C / E (Switch: K = 1 per token).
    title: figure title.
    experts_choose: Expert Choice tallies (`routing_stats.RoutingTally`): shares
      per token, 'chosen' = first choices (outlined over the kept bars), and
      the title gives the share of tokens that no expert took.
  """
  names = list(layers)
  cols = min(len(names), 3)
  rows = math.ceil(len(names) / cols)
  figure = Figure(figsize=(4.2 * cols, 3.0 * rows + 0.6), layout='constrained')
  experts = np.arange(num_experts)
  for i, name in enumerate(names):
    ax = figure.add_subplot(rows, cols, i + 1)
    chosen = np.asarray(layers[name]['expert_chosen_share'])
    kept = np.asarray(layers[name]['expert_kept_share'])
    colors = expert_colors(num_experts).colors
    if experts_choose:
      ax.bar(experts, kept, color=colors, label='taken by the expert')
      ax.bar(experts, chosen, fill=False, edgecolor='k', hatch='///', label='first choice')
    else:
      ax.bar(experts, chosen, color='white', edgecolor='k', hatch='///', label='chosen, dropped')
      ax.bar(experts, kept, color=colors, label='chosen and processed')
    ax.axhline(1.0 / num_experts, color='k', ls='--', lw=0.8, label='balanced, 1/E')
    if capacity_factor:
      ax.axhline(
        capacity_factor / num_experts, color='tab:red', ls=':', lw=1.2, label='capacity, C/E'
      )
    if experts_choose:
      skipped = layers[name]['skipped_token_share']
      ax.set_title(f'{name}: {100 * skipped:.1f}% of tokens taken by no expert', size=9)
    else:
      dropped = 1.0 - kept.sum() / max(chosen.sum(), 1e-12)
      ax.set_title(f'{name}: {100 * dropped:.1f}% of assignments dropped', size=9)
    ax.set_xticks(experts if num_experts <= 32 else experts[:: max(1, num_experts // 16)])
    ax.set_xlabel('expert', size=8)
    ax.set_ylabel('assignments per token' if experts_choose else 'share of assignments', size=8)
    ax.tick_params(labelsize=7)
    ax.set_ylim(0, 1.12 * max(float(np.max(chosen)), float(np.max(kept)), 1.0 / num_experts))
  # One legend for all layers, under them: inside an axes it hid the bars (the dropped share).
  handles, labels = figure.axes[0].get_legend_handles_labels()
  figure.legend(handles, labels, loc='outside lower center', ncol=len(labels), fontsize=7)
  figure.suptitle(title or 'Expert load per MoE layer', size=10)
  return _save(figure, path)


def plot_class_expert(
  layers: Mapping[str, np.ndarray],
  path: str,
  class_names: Sequence[str] | None = None,
  title: str = '',
) -> str:
  """Per MoE layer, a heatmap: row = class, column = expert, value = share of that
  class's tokens whose first choice is that expert (each row sums to 1).

  Args:
    layers: {'block_XX': (L, E) row shares}.
    path: the PNG to write.
    class_names: labels of the rows (default 0..L-1; left out past 40 classes).
    title: figure title.
  """
  names = list(layers)
  num_classes, num_experts = np.asarray(layers[names[0]]).shape
  cols = min(len(names), 3)
  rows = math.ceil(len(names) / cols)
  height = min(0.28 * num_classes + 1.5, 12)
  figure = Figure(
    figsize=(0.35 * num_experts * cols + 2.5 * cols, height * rows + 0.6), layout='constrained'
  )
  vmax = max(float(np.max(layers[name])) for name in names) or 1.0
  image = None
  for i, name in enumerate(names):
    ax = figure.add_subplot(rows, cols, i + 1)
    shares = np.asarray(layers[name])
    image = ax.imshow(shares, cmap='viridis', vmin=0.0, vmax=vmax, aspect='auto')
    ax.set_title(name, size=9)
    ax.set_xlabel('expert (first choice)', size=8)
    ax.set_ylabel('class', size=8)
    if num_experts <= 32:
      ax.set_xticks(np.arange(num_experts))
    if num_classes <= 40:
      ax.set_yticks(np.arange(num_classes), labels=class_names or list(range(num_classes)))
    ax.tick_params(labelsize=7)
  figure.colorbar(image, ax=figure.axes, shrink=0.8, label="share of the class's tokens")
  figure.suptitle(title or 'Where each class goes: first-choice expert of its tokens', size=10)
  return _save(figure, path)


def _show_image(ax, image: np.ndarray, grid: tuple[int, int]) -> None:
  """An image in [-1, 1] (H, W, C), with the patch boundaries drawn over it."""
  pixels = np.clip((np.asarray(image, np.float32) + 1.0) / 2.0, 0.0, 1.0)
  rows, cols = grid
  extent = (0, cols, rows, 0)  # One unit per patch, as in the assignment grids.
  if pixels.shape[-1] == 1:
    ax.imshow(pixels[..., 0], cmap='gray_r', vmin=0, vmax=1, extent=extent)
  else:
    ax.imshow(pixels, extent=extent)
  for r in range(1, rows):
    ax.axhline(r, color='tab:red', lw=0.4, alpha=0.5)
  for c in range(1, cols):
    ax.axvline(c, color='tab:red', lw=0.4, alpha=0.5)


def plot_examples(
  images: np.ndarray,
  captions: Sequence[str],
  panels: Sequence[tuple[str, np.ndarray, np.ndarray]],
  num_experts: int,
  path: str,
  title: str = '',
) -> str:
  """Test images beside their patch -> expert assignment under several routings.

  Args:
    images: (n, H, W, C) in [-1, 1].
    captions: n strings (e.g. 'label 3, predicted 3').
    panels: (heading, experts (n, rows, cols) int, skipped (n, rows, cols)
      bool) per routing setting; a skipped patch (no expert processed it) is
      drawn pale with a black cross.
    num_experts: E.
    path: the PNG to write.
    title: figure title.
  """
  num_images = len(images)
  grid = panels[0][1].shape[1:]
  cmap = expert_colors(num_experts)
  figure = Figure(figsize=(2.0 * (1 + len(panels)), 2.0 * num_images + 0.8), layout='constrained')
  axes = figure.subplots(num_images, 1 + len(panels), squeeze=False)
  for i in range(num_images):
    _show_image(axes[i, 0], images[i], grid)
    axes[i, 0].set_ylabel(captions[i], size=8)
    for j, (heading, experts, skipped) in enumerate(panels):
      ax = axes[i, j + 1]
      ax.imshow(
        experts[i], cmap=cmap, vmin=-0.5, vmax=num_experts - 0.5, extent=(0, grid[1], grid[0], 0)
      )
      rr, cc = np.nonzero(skipped[i])
      if len(rr):
        for r, c in zip(rr, cc):
          ax.add_patch(_white_box(c, r))
        ax.scatter(cc + 0.5, rr + 0.5, marker='x', color='k', s=18, linewidths=1.0)
      if i == 0:
        ax.set_title(heading, size=8)
      ax.set_xlabel(f'{int(np.sum(skipped[i]))}/{skipped[i].size} skipped', size=7)
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  axes[0, 0].set_title('image (patch grid)', size=8)
  handles = [
    _legend_patch(cmap(e), f'expert {e}') for e in range(num_experts) if num_experts <= 16
  ] + [_legend_patch('white', 'skipped (x)', edge='k')]
  figure.legend(handles=handles, loc='outside lower center', ncol=min(len(handles), 5), fontsize=7)
  figure.suptitle(title or 'Patch -> first-choice expert (last MoE layer)', size=10)
  return _save(figure, path)


def _white_box(col: int, row: int):
  return Rectangle((col, row), 1, 1, facecolor='white', alpha=0.7, edgecolor='none')


def _legend_patch(color, label: str, edge: str = 'none'):
  return Patch(facecolor=color, edgecolor=edge, label=label)
