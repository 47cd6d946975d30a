"""The six matmuls of one MoE layer's expert MLPs, timed alone on its capacity buffers.

`python -m vmoe_jax.bench --expert_matmuls`: at each E, the forward matmuls
of the expert MLPs and those of their backward pass (input and weight
gradients), batched over experts, on random operands of the case's buffer
shape, timed in interleaved rounds (`benchmark.time_cases`).

Axis letters: E experts, C rows per expert (one routing group's capacity),
D width, H expert hidden width.
"""

from __future__ import annotations

import functools
import statistics

import jax
import numpy as np

from vmoe_jax.models import factory
from vmoe_jax.moe import routers
from vmoe_jax.moe import routing
from vmoe_jax.tools import benchmark
from vmoe_jax.tools.benchmark import BenchSettings
from vmoe_jax.tools.benchmark import Case

# The matmuls of an expert MLP y = gelu(x W_in) W_out and of its backward pass,
# batched over experts: (einsum, lhs, rhs); x, dy: (E, C, D), h, dh: (E, C, H).
EXPERT_MATMULS = {
  'x · W_in': ('ecd,edh->ech', 'x', 'w_in'),
  'h · W_out': ('ech,ehd->ecd', 'h', 'w_out'),
  'dy · W_out^T': ('ecd,ehd->ech', 'dy', 'w_out'),
  'dh · W_in^T': ('ech,edh->ecd', 'dh', 'w_in'),
  'x^T · dh (dW_in)': ('ecd,ech->edh', 'x', 'dh'),
  'h^T · dy (dW_out)': ('ech,ecd->ehd', 'h', 'dy'),
}


def expert_matmul_operands(
  num_experts: int, capacity: int, width: int, mlp_dim: int, dtype: str = 'float32'
) -> dict:
  """Random operands of `EXPERT_MATMULS` for E experts of `capacity` rows each."""
  rng = np.random.default_rng(0)
  shapes = {
    'x': (num_experts, capacity, width),
    'dy': (num_experts, capacity, width),
    'h': (num_experts, capacity, mlp_dim),
    'dh': (num_experts, capacity, mlp_dim),
    'w_in': (num_experts, width, mlp_dim),
    'w_out': (num_experts, mlp_dim, width),
  }
  return {k: jax.numpy.asarray(rng.normal(size=v), dtype) for k, v in shapes.items()}


def expert_rows(settings: BenchSettings, case: Case) -> int:
  """C, the rows of every expert buffer of one routing group of a case at training.

  The group holds `group_size` images, or all `batch_size` images when it is 0.
  The router's own capacity (`routers.get(router).capacity`; Soft MoE:
  its slots per expert); dropless has no buffers: the balanced share
  ceil(K * S / E).
  """
  tokens = benchmark.tokens_per_image(settings)
  group = (settings.group_size_for(case.router) or settings.batch_size) * tokens
  capacity = routers.get(case.router).capacity
  if capacity is None:
    return routing.compute_capacity(group, case.num_experts, case.num_selected, 1.0)
  spec = factory.moe_spec(benchmark.case_config(settings, case))
  return capacity(spec, group, tokens, True)


def time_expert_matmuls(settings: BenchSettings, cases: list[Case]) -> tuple[list[dict], str]:
  """Rows and a table: median ms of every expert matmul of every (MoE) case, interleaved.

  With one router and a fixed capacity factor, E x C stays about the same
  while C shrinks with E: what the table shows is how the matmuls' speed
  depends on their shape.
  """
  columns, runs, keys = [], [], []
  one_router = len({c.router for c in cases}) == 1
  for case in cases:
    rows_per_expert = expert_rows(settings, case)
    name = f'E={case.num_experts} (C={rows_per_expert})'
    columns.append(name if one_router else f'{case.router} {name}')
    operands = expert_matmul_operands(
      case.num_experts, rows_per_expert, settings.width, settings.mlp_dim, settings.dtype
    )
    for matmul, (spec, lhs, rhs) in EXPERT_MATMULS.items():
      fn = jax.jit(functools.partial(jax.numpy.einsum, spec))
      keys.append((case, rows_per_expert, matmul))
      runs.append(functools.partial(fn, operands[lhs], operands[rhs]))
  times = benchmark.time_cases(runs, settings.steps, settings.warmup, interleave=True)
  rows = [
    dict(
      router=case.router,
      num_experts=case.num_experts,
      capacity=capacity,
      matmul=matmul,
      seconds_median=statistics.median(t),
      seconds_all=t,
    )
    for (case, capacity, matmul), t in zip(keys, times)
  ]
  ms = np.array([1000 * r['seconds_median'] for r in rows]).reshape(len(cases), -1)
  lines = [f'| matmul (ms) | {" | ".join(columns)} |', '| --- |' + ' ---: |' * len(cases)]
  for i, matmul in enumerate([*EXPERT_MATMULS, 'sum']):
    values = ms.sum(axis=1) if matmul == 'sum' else ms[:, i]
    lines.append(f'| {matmul} | ' + ' | '.join(f'{v:.1f}' for v in values) + ' |')
  return rows, '\n'.join(lines)
