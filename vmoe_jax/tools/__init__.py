"""Library code of the benchmark and profiling commands, importable and flag-free.

  benchmark.py       cases of dense and MoE ViTs per router, timed in rounds (`vmoe_jax.bench`)
  expert_matmuls.py  the expert matmuls of every router alone, timed (`vmoe_jax.bench`)
  profiling.py       one MoE layer's phases on a mesh, all_to_all bytes (`vmoe_jax.profile_moe`)

Functions here take plain arguments (frozen settings dataclasses, lists);
the flags live in the entry-point modules only.
"""
