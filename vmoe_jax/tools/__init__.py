"""Library code of the command-line tools, importable and flag-free.

  benchmark.py   cases of dense and MoE ViTs per router, timed in rounds (`vmoe_jax.bench`)
  profiling.py   the phases of one MoE layer on a mesh, all_to_all bytes (`vmoe_jax.profile_moe`)
  evaluation.py  the capacity sweep of a trained checkpoint (`vmoe_jax.evaluate`)
  eval_report.py the report of an evaluation (eval.json rows, eval.md)
  eval_maps.py   the routing maps of an evaluation (PNGs)

Functions here take plain arguments (frozen settings dataclasses, lists);
the flags live in the entry-point modules only.
"""
