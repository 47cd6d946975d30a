"""The package's import graph: no circle, and no module importing from a layer above its own.

Every module of `vmoe_jax` is parsed with `ast` (nothing is imported), and
every import of a package module is an edge, at module level or inside a
function alike. `LAYERS` orders the packages and top-level modules from the
bottom up: a module may import from its own layer and the layers below, never
from one above. Within a layer (a package, or the entry points) any order is
allowed, and the circle check keeps it a hierarchy too.
"""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = 'vmoe_jax'

# Bottom to top. A name is a subpackage of vmoe_jax or one of its top-level modules.
LAYERS = (
  ('errors',),  # The one exception type, imported by every layer.
  ('runtime',),  # The mesh and its axis names, processes, the host allocator.
  ('optim',),  # Optimizers and schedules.
  ('storage',),  # Checkpoints, checksums, the workdir's files, metrics, results.
  ('moe',),  # The MoE spec (a leaf), routers, routing, the layer.
  ('models',),  # The ViT, building it from a config, FLOPs.
  ('data',),  # The Dataset type (a leaf), in-memory datasets, TFDS.
  ('schema',),  # Config keys, rules and checks: they read the lists of the layers below.
  ('inference',),  # A trained model from a workdir.
  ('transfer',),  # Initialising from other runs (through inference), distillation.
  ('steps',),  # The jitted train and eval steps (distillation's loss).
  ('evaluation',),  # Evaluating trained runs, the ledger.
  ('tools',),  # Benchmark and profiling libraries (over the train step).
  ('train',),  # The trainer.
  ('main', 'evaluate', 'bench', 'profile_moe'),  # The commands.
)
# Modules that import nothing of the package, or nothing but `errors`.
LEAVES = {'vmoe_jax.moe.spec': set(), 'vmoe_jax.data.dataset': {'vmoe_jax.errors'}}


def package_modules() -> dict[str, str]:
  """{'vmoe_jax.moe.spec': path, ...}; a package's __init__ under the package's name."""
  modules = {}
  for directory, _, files in os.walk(os.path.join(REPO, PACKAGE)):
    for name in files:
      if not name.endswith('.py'):
        continue
      path = os.path.join(directory, name)
      parts = os.path.relpath(path, REPO)[: -len('.py')].split(os.sep)
      if parts[-1] == '__init__':
        parts = parts[:-1]
      modules['.'.join(parts)] = path
  return modules


def imports_of(module: str, path: str, modules: dict[str, str]) -> set[str]:
  """The package modules that `module` imports, wherever in the file the import stands."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  is_package = path.endswith('__init__.py')
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        parent = module.split('.')[: len(module.split('.')) - node.level + is_package]
        base = '.'.join([*parent, *([base] if base else [])])
      # `from P import M` imports module P.M; `from M import name`, module M.
      names = [f'{base}.{a.name}' if f'{base}.{a.name}' in modules else base for a in node.names]
    else:
      continue
    found.update(n for n in names if n in modules and n != module)
  # Importing a package's module runs the package's __init__ too; that is no edge.
  return {n for n in found if not os.path.basename(modules[n]) == '__init__.py'}


def graph() -> dict[str, set[str]]:
  modules = package_modules()
  return {m: imports_of(m, path, modules) for m, path in modules.items()}


def layer_of(module: str) -> int:
  name = module.split('.')[1] if module != PACKAGE else ''
  for index, names in enumerate(LAYERS):
    if name in names:
      return index
  raise AssertionError(
    f'{module} is in no layer of LAYERS; add vmoe_jax.{name} to the layer it belongs to'
  )


def find_circle(edges: dict[str, set[str]]) -> list[str] | None:
  """A circle of imports (a list whose last item is its first), or None."""
  state, stack = {}, []

  def visit(module):
    state[module] = 'open'
    stack.append(module)
    for target in sorted(edges[module]):
      if state.get(target) == 'open':
        return [*stack[stack.index(target) :], target]
      if target not in state and (circle := visit(target)):
        return circle
    state[module] = 'done'
    stack.pop()
    return None

  for module in sorted(edges):
    if module not in state and (circle := visit(module)):
      return circle
  return None


def test_no_import_circle():
  circle = find_circle(graph())
  assert circle is None, 'import circle: ' + ' -> '.join(circle)


def test_no_import_from_a_layer_above():
  upward = [
    f'{module} (layer {LAYERS[layer_of(module)]}) imports {target} '
    f'(layer {LAYERS[layer_of(target)]})'
    for module, targets in sorted(graph().items())
    if module != PACKAGE
    for target in sorted(targets)
    if layer_of(target) > layer_of(module)
  ]
  assert not upward, '\n'.join(upward)


def test_leaves_import_nothing_of_the_package():
  edges = graph()
  for module, allowed in LEAVES.items():
    assert edges[module] <= allowed, f'{module} imports {sorted(edges[module] - allowed)}'


def test_top_level_holds_the_commands_the_trainer_and_few_modules():
  top = sorted(m.split('.')[1] for m in graph() if m.count('.') == 1)
  modules = [m for m in top if not os.path.isdir(os.path.join(REPO, PACKAGE, m))]
  assert len(modules) <= 8, modules
  for name in top:
    layer_of(f'{PACKAGE}.{name}')  # Every package and module has its layer.


@pytest.mark.parametrize(
  'edges, circle',
  [
    ({'a': {'b'}, 'b': {'c'}, 'c': set()}, None),
    ({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}, ['a', 'b', 'c', 'a']),
    ({'a': {'b'}, 'b': {'b', 'c'}, 'c': set()}, ['b', 'b']),
  ],
)
def test_find_circle(edges, circle):
  assert find_circle(edges) == circle


def test_function_level_imports_count(tmp_path):
  (tmp_path / 'a.py').write_text('def f():\n  from vmoe_jax.moe import routers\n')
  modules = {'vmoe_jax.moe.routers': 'routers.py', 'vmoe_jax.moe.spec': 'spec.py'}
  found = imports_of('vmoe_jax.moe.spec', str(tmp_path / 'a.py'), modules)
  assert found == {'vmoe_jax.moe.routers'}
