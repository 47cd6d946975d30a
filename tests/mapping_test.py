"""Mapping source parameters into a target ViT: loading, new heads, resizing, upcycling, npz."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vmoe_jax.errors import UserError
from vmoe_jax.models import heads
from vmoe_jax.models import vit
from vmoe_jax.moe.spec import MoeSpec
from vmoe_jax.transfer import mapping
from vmoe_jax.transfer import npz_loader
from vmoe_jax.transfer import pos_resize

WIDTH, MLP, EXPERTS = 16, 32, 4
NO_DROP = dict(capacity_factor=EXPERTS, eval_capacity_factor=EXPERTS)


def make_vit(**kwargs):
  settings = dict(num_classes=5, patch_size=4, width=WIDTH, depth=4, num_heads=2, mlp_dim=MLP)
  return vit.ViT(**{**settings, **kwargs})


def moe_vit(num_experts=EXPERTS, **kwargs):
  moe = dict(num_experts=num_experts, num_selected=1, renormalize=True, **NO_DROP)
  moe.update(kwargs.pop('moe', {}))
  moe.setdefault('mlp_dim', MLP)
  moe.setdefault('group_size', 0)  # The tests init with one image.
  return make_vit(moe=MoeSpec(layers=(1, 3), **moe), **kwargs)


def init(model, image=8, seed=0, boxed=False):
  """Random parameters of the model's shapes (shapes by tracing: nothing compiles)."""
  variables = jax.eval_shape(
    lambda: model.init({'params': jax.random.key(0)}, jnp.zeros((1, image, image, 3)), train=False)
  )
  params = variables['params'] if boxed else nn.meta.unbox(variables['params'])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.normal(size=x.shape).astype(x.dtype) * 0.5, params)


_APPLY = {}


def _apply(model, train):
  """The jitted forward pass, compiled once per model (modules with dicts do not hash)."""
  key = (repr(model), train)
  if key not in _APPLY:
    fn = lambda params, images: model.apply({'params': params}, images, train=train)[0]
    _APPLY[key] = jax.jit(fn)
  return _APPLY[key]


def logits(model, params, image=8, train=False):
  images = jax.random.normal(jax.random.key(7), (4, image, image, 3))
  return _apply(model, train)(params, images)


def actions(report):
  """{path: action}; a target path's action wins over 'unused' for a source path of that name."""
  entries = sorted(report, key=lambda e: e.action != 'unused')
  return {e.path: e.action for e in entries}


def assert_trees_equal(a, b):
  fa, fb = mapping.flatten(a), mapping.flatten(b)
  assert sorted(fa) == sorted(fb)
  for path in fa:
    np.testing.assert_array_equal(fa[path], fb[path], err_msg=path)


# --------------------------------------------------------------------------- loading, heads


def test_same_architecture_loads_everything():
  model = make_vit()
  source = init(model)
  params, report = mapping.init_params(source, init(model, seed=1))
  assert_trees_equal(params, source)
  assert set(actions(report).values()) == {'loaded'}
  n = len(mapping.flatten(source))
  assert mapping.format_report(report) == f'init_from: {n} loaded'


def test_new_number_of_classes_gives_a_zero_head():
  source = init(make_vit(num_classes=10))
  target = init(make_vit(num_classes=5), seed=1)
  params, report = mapping.init_params(source, target)
  assert actions(report)['head/kernel'] == actions(report)['head/bias'] == 'fresh'
  np.testing.assert_array_equal(params['head']['kernel'], np.zeros((WIDTH, 5)))
  np.testing.assert_array_equal(params['head']['bias'], np.zeros(5))
  np.testing.assert_array_equal(
    params['block_00']['mlp']['Dense_0']['kernel'], source['block_00']['mlp']['Dense_0']['kernel']
  )
  line = mapping.format_report(report)
  assert line.endswith('loaded, 2 fresh (head/bias, head/kernel)'), line


def test_boxed_target_keeps_its_boxes():
  model = moe_vit()
  source = init(model)
  params, _ = mapping.init_params(source, init(model, seed=1, boxed=True))
  wi = params['block_01']['moe']['wi']
  assert isinstance(wi, nn.Partitioned) and wi.names == ('expert', None, None)
  np.testing.assert_array_equal(wi.value, source['block_01']['moe']['wi'])


# --------------------------------------------------------------------------- upcycling


@pytest.mark.parametrize('train', [False, True])
def test_upcycled_top1_moe_gives_the_dense_logits(train):
  dense, sparse = make_vit(), moe_vit()
  source = init(dense)
  target = init(sparse, seed=1)
  params, report = mapping.init_params(source, target)
  # Every expert is the dense MLP, the renormalised top-1 weight is 1 and a
  # capacity of E drops no token. train=True routes with capacity_factor
  # (no dropout, no router noise: the dense model's train logits are its eval logits).
  expected = logits(dense, source)
  assert np.asarray(expected).std() > 0.1  # Not a trivial comparison of near-zero logits.
  np.testing.assert_allclose(logits(sparse, params, train=train), expected, atol=1e-5, rtol=0)
  got = actions(report)
  for block in ('block_01', 'block_03'):
    assert [got[f'{block}/moe/{n}'] for n in ('wi', 'bi', 'wo', 'bo')] == ['upcycled'] * 4
    assert got[f'{block}/moe/router'] == 'fresh'
    np.testing.assert_array_equal(params[block]['moe']['router'], target[block]['moe']['router'])
    wi = params[block]['moe']['wi']
    for e in range(EXPERTS):
      np.testing.assert_array_equal(wi[e], source[block]['mlp']['Dense_0']['kernel'])
  line = mapping.format_report(report)
  assert '8 upcycled, 2 fresh (block_01/moe/router, block_03/moe/router)' in line, line


def test_without_renormalisation_the_top1_gate_scales_the_experts():
  # The control of the test above: it is sensitive to the combine weight.
  dense, sparse = make_vit(), moe_vit(moe=dict(renormalize=False))
  source = init(dense)
  params, _ = mapping.init_params(source, init(sparse, seed=1))
  gap = np.abs(np.asarray(logits(sparse, params) - logits(dense, source))).max()
  assert gap > 1e-3


def test_upcycle_noise_is_relative_per_expert_and_keyed():
  dense, sparse = make_vit(), moe_vit()
  source = init(dense)
  target = init(sparse, seed=1)
  kwargs = dict(upcycle_noise_std=0.1, rng=jax.random.key(3))
  params, report = mapping.init_params(source, target, **kwargs)
  again, _ = mapping.init_params(source, target, **kwargs)
  assert_trees_equal(params, again)
  w = np.asarray(source['block_01']['mlp']['Dense_0']['kernel'])
  wi = np.asarray(params['block_01']['moe']['wi'])
  relative = (wi - w) / w.std()  # (E, D, H): N(0, 0.1^2) draws.
  assert abs(relative.std() - 0.1) < 0.01 and abs(relative.mean()) < 0.01
  assert not np.allclose(wi[0], wi[1])  # Each expert its own noise.
  assert 'noise 0.1 x std' in [e for e in report if e.path == 'block_01/moe/wi'][0].note
  other, _ = mapping.init_params(source, target, upcycle_noise_std=0.1, rng=jax.random.key(4))
  assert not np.allclose(other['block_01']['moe']['wi'], wi)


def test_expert_mean_of_an_upcycled_model_is_the_dense_model():
  dense, sparse = make_vit(), moe_vit()
  source = init(dense)
  upcycled, _ = mapping.init_params(source, init(sparse, seed=1))
  back, report = mapping.init_params(upcycled, init(dense, seed=2), moe_to_dense='expert_mean')
  assert_trees_equal(back, source)
  got = actions(report)
  assert got['block_01/mlp/Dense_0/kernel'] == 'averaged'
  assert got['block_01/moe/router'] == 'unused'


def test_moe_to_dense_fresh_keeps_the_targets_mlp():
  sparse, dense = moe_vit(), make_vit()
  target = init(dense, seed=2)
  params, report = mapping.init_params(init(sparse), target, moe_to_dense='fresh')
  np.testing.assert_array_equal(
    params['block_01']['mlp']['Dense_0']['kernel'], target['block_01']['mlp']['Dense_0']['kernel']
  )
  line = mapping.format_report(report)
  assert (
    '8 fresh' in line and '10 unused (block_01/moe/bi, block_01/moe/bo, block_01/moe/router' in line
  ), line


# --------------------------------------------------------------------------- pos_embedding


def test_resize_grid_keeps_a_linear_ramp_linear():
  # f(r, c) = 10 r + c on a 3 x 3 grid; 5 x 5 samples r, c in {0, .5, 1, 1.5, 2}.
  r, c = np.meshgrid(np.arange(3), np.arange(3), indexing='ij')
  grid = (10 * r + c)[..., None].astype(np.float32)
  out = pos_resize.resize_grid(grid, (5, 5))[..., 0]
  rr, cc = np.meshgrid(np.arange(5) / 2, np.arange(5) / 2, indexing='ij')
  np.testing.assert_allclose(out, 10 * rr + cc, atol=1e-5)
  # Corners stay corners, non-square both ways: 3 x 3 -> 2 x 4.
  out = pos_resize.resize_grid(grid, (2, 4))[..., 0]
  np.testing.assert_allclose(
    out, [[0, 2 / 3, 4 / 3, 2], [20, 20 + 2 / 3, 20 + 4 / 3, 22]], atol=1e-5
  )


def test_resize_grid_constant_along_rows_and_columns():
  rows = np.broadcast_to(np.array([1.0, 4.0, 7.0, 10.0])[:, None, None], (4, 6, 2))
  out = pos_resize.resize_grid(rows, (7, 3))
  np.testing.assert_allclose(
    out[..., 0], np.broadcast_to(np.arange(1, 11.0, 1.5)[:, None], (7, 3)), atol=1e-5
  )
  cols = np.broadcast_to(np.array([3.0, 5.0])[None, :, None], (5, 2, 1))
  out = pos_resize.resize_grid(cols, (2, 3))
  np.testing.assert_allclose(out[..., 0], [[3, 4, 5], [3, 4, 5]], atol=1e-6)


def test_pos_embedding_28_to_8_pixels_keeps_the_class_token_and_the_corners():
  model = make_vit()
  source = init(model, image=28)  # 7 x 7 patches + the class token: (1, 50, D).
  r, c = np.meshgrid(np.arange(7), np.arange(7), indexing='ij')
  grid = (10.0 * r + c).reshape(1, 49, 1) + 100.0 * np.arange(WIDTH)
  source['pos_embedding'] = jnp.asarray(
    np.concatenate([np.full((1, 1, WIDTH), -1.0), grid], 1), jnp.float32
  )
  target = init(model, image=8, seed=1)
  params, report = mapping.init_params(source, target, source_grid=(7, 7), target_grid=(2, 2))
  pos = np.asarray(params['pos_embedding'])
  assert pos.shape == (1, 5, WIDTH)
  np.testing.assert_array_equal(pos[0, 0], -1.0)
  corners = np.array([0, 6, 60, 66])[:, None] + 100.0 * np.arange(WIDTH)  # (0,0) (0,6) (6,0) (6,6).
  np.testing.assert_allclose(pos[0, 1:], corners, atol=1e-4)
  line = mapping.format_report(report)
  assert ' loaded, 1 resized (pos_embedding (1, 50, 16) -> (1, 5, 16))' in line, line
  assert logits(model, params, image=8).shape == (4, 5)
  # Square grids need not be given.
  inferred, _ = mapping.init_params(source, target)
  np.testing.assert_array_equal(inferred['pos_embedding'], params['pos_embedding'])


def test_pos_embedding_non_square_grid_needs_the_grid():
  source = init(make_vit(), image=8)
  source = dict(source, pos_embedding=jnp.zeros((1, 1 + 2 * 3, WIDTH)))
  with pytest.raises(
    UserError,
    match=re.escape(
      'the source has 6 patch positions (1, 7, 16), not a square grid; '
      'pass source_grid=(rows, cols).'
    ),
  ):
    mapping.init_params(source, init(make_vit(), image=8, seed=1))
  params, _ = mapping.init_params(source, init(make_vit(), image=8, seed=1), source_grid=(2, 3))
  assert params['pos_embedding'].shape == (1, 5, WIDTH)
  with pytest.raises(
    UserError,
    match=re.escape(
      'source_grid=(3, 3) has 9 positions but the source pos_embedding (1, 7, 16) has 6 patch '
      'positions'
    ),
  ):
    mapping.init_params(source, init(make_vit(), image=8, seed=1), source_grid=(3, 3))


def test_token_model_into_gap_model_drops_the_class_token():
  source = init(make_vit())
  params, report = mapping.init_params(source, init(make_vit(classifier='gap'), seed=1))
  np.testing.assert_array_equal(params['pos_embedding'], source['pos_embedding'][:, 1:])
  assert actions(report)['pos_embedding'] == 'resized' and actions(report)['cls'] == 'unused'


# --------------------------------------------------------------------------- errors


def test_moe_with_other_number_of_experts_is_an_error():
  with pytest.raises(UserError) as e:
    mapping.init_params(init(moe_vit(num_experts=8)), init(moe_vit(num_experts=16), seed=1))
  assert str(e.value) == (
    'cannot map block_01/moe/wi: the source has shape (8, 16, 32), the target (16, 16, 32); use a '
    'target with 8 experts (--config.model.moe.num_experts=8) or a source that matches'
  )


def test_keep_fresh_keeps_the_targets_init():
  target = init(make_vit(), seed=1)
  params, report = mapping.init_params(init(make_vit()), target, keep_fresh=('block_00/',))
  assert_trees_equal(params['block_00'], target['block_00'])
  assert actions(report)['block_00/mlp/Dense_0/kernel'] == 'fresh'
  assert actions(report)['block_00/mlp/Dense_1/bias'] == 'fresh'
  assert actions(report)['block_01/mlp/Dense_0/kernel'] == 'loaded'


def test_moe_with_other_expert_width_is_an_error():
  with pytest.raises(UserError) as e:
    mapping.init_params(init(moe_vit()), init(moe_vit(moe=dict(mlp_dim=48)), seed=1))
  assert str(e.value) == (
    'cannot map block_01/moe/wi: the source has shape (4, 16, 32), the target (4, 16, 48); '
    "use a target with the source's width and expert MLP width (--config.model.width, "
    '--config.model.moe.mlp_dim) or a source that matches'
  )


def test_upcycling_into_other_widths_is_an_error():
  with pytest.raises(UserError) as e:
    mapping.init_params(init(make_vit()), init(moe_vit(moe=dict(mlp_dim=48)), seed=1))
  assert str(e.value).startswith(
    'cannot upcycle block_01/mlp/Dense_0/kernel into block_01/moe/wi: the source has shape '
    '(16, 32), each target expert (16, 48); '
  )


def test_moe_into_dense_is_an_error_by_default():
  with pytest.raises(UserError) as e:
    mapping.init_params(init(moe_vit()), init(make_vit(), seed=1))
  assert str(e.value) == (
    "cannot map block_01/moe into the dense block_01/mlp: the source block is an MoE, the target's"
    ' is dense; make block 1 an MoE layer of the target (--config.model.moe.layers), or distil'
    ' the MoE into a dense student (config.distill)'
  )


def test_target_deeper_than_source_is_an_error_listing_the_paths():
  with pytest.raises(UserError) as e:
    mapping.init_params(init(make_vit(depth=2)), init(make_vit(depth=3), seed=1))
  assert str(e.value) == (
    "the source lacks 16 of the target's parameters (block_02/attention/key/bias, "
    'block_02/attention/key/kernel, block_02/attention/out/bias, block_02/attention/out/kernel, '
    'block_02/attention/query/bias, block_02/attention/query/kernel, ... (10 more)); use a source '
    'with the same architecture, or keep them fresh (keep_fresh)'
  )


def test_source_deeper_than_target_reports_unused_blocks():
  _, report = mapping.init_params(init(make_vit(depth=4)), init(make_vit(depth=3), seed=1))
  unused = [e.path for e in report if e.action == 'unused']
  assert len(unused) == 16 and all(p.startswith('block_03/') for p in unused)


def test_stray_source_weight_in_a_target_block_is_an_error():
  source = dict(mapping.flatten(init(make_vit())))
  source['block_00/extra/kernel'] = np.zeros((2, 2))
  with pytest.raises(
    UserError,
    match=re.escape(
      "source parameters block_00/extra/kernel have no place in the target's block_00"
    ),
  ):
    mapping.init_params(mapping.unflatten(source), init(make_vit(), seed=1))


def test_other_patch_size_and_width_are_errors():
  with pytest.raises(
    UserError,
    match=re.escape(
      'cannot map embedding/kernel: the source has shape (2, 2, 3, 16), the target '
      '(4, 4, 3, 16); use --config.model.patch_size=2'
    ),
  ):
    mapping.init_params(init(make_vit(patch_size=2)), init(make_vit(), seed=1))
  with pytest.raises(
    UserError,
    match=re.escape(
      'the source has shape (4, 4, 3, 16), the target (4, 4, 3, 24); '
      "use a target with the source's architecture"
    ),
  ):
    mapping.init_params(init(make_vit()), init(make_vit(width=24), seed=1))


def test_bad_options_are_errors():
  model = moe_vit()
  with pytest.raises(UserError, match='upcycle_noise_std=0.1 needs .* an rng key'):
    mapping.init_params(init(make_vit()), init(model), upcycle_noise_std=0.1)
  with pytest.raises(UserError, match="moe_to_dense='mean' is unknown"):
    mapping.init_params(init(model), init(model), moe_to_dense='mean')


def test_lenient_copies_what_has_the_same_path_and_shape_and_keeps_the_rest_fresh():
  source, target = init(make_vit(depth=2)), init(make_vit(width=24), seed=1)
  params, report = mapping.init_params(source, target, lenient=True)
  got = actions(report)
  # Same path and shape (the MLP biases: mlp_dim is 32 in both): copied.
  assert got['block_00/mlp/Dense_0/bias'] == 'loaded'
  np.testing.assert_array_equal(
    params['block_00']['mlp']['Dense_0']['bias'], source['block_00']['mlp']['Dense_0']['bias']
  )
  # Other widths, or not in the source: the target's init.
  assert got['block_00/mlp/Dense_0/kernel'] == got['block_03/mlp/Dense_0/bias'] == 'fresh'
  np.testing.assert_array_equal(
    params['block_00']['mlp']['Dense_0']['kernel'], target['block_00']['mlp']['Dense_0']['kernel']
  )
  assert got['embedding/kernel'] == 'fresh'


# --------------------------------------------------------------------------- npz


def to_vit_release(params):
  """Our flat names -> the ViT release's (MHA_1, LayerNorm_2, MlpBlock_3, cls position)."""
  out = {}
  for path, value in mapping.flatten(params).items():
    if m := re.fullmatch(r'block_(\d+)/(.+)', path):
      rest = m.group(2)
      for ours, theirs in [
        ('norm_attention', 'LayerNorm_0'),
        ('norm_mlp', 'LayerNorm_2'),
        ('attention', 'MultiHeadDotProductAttention_1'),
        ('mlp', 'MlpBlock_3'),
      ]:
        rest = re.sub(f'^{ours}/', f'{theirs}/', rest)
      path = f'Transformer/encoderblock_{int(m.group(1))}/{rest}'
    elif path == 'pos_embedding':
      path = 'Transformer/posembed_input/pos_embedding'
    elif path.startswith('encoder_norm/'):
      path = 'Transformer/' + path
    out[path] = np.asarray(value)
  return out


def to_big_vision(params, scan=False):
  """Our flat names -> big_vision's: params/, MHA_0, LayerNorm_1, MlpBlock_0, no cls position."""
  out = {}
  for path, value in to_vit_release(params).items():
    path = (
      path.replace('LayerNorm_2', 'LayerNorm_1')
      .replace('MultiHeadDotProductAttention_1', 'MultiHeadDotProductAttention_0')
      .replace('MlpBlock_3', 'MlpBlock_0')
    )
    if path == 'Transformer/posembed_input/pos_embedding':
      path, value = 'pos_embedding', value[:, 1:]
    out[path] = value
  if scan:
    blocks = sorted(
      {k for k in out if k.startswith('Transformer/encoderblock_')},
      key=lambda k: int(k.split('/')[1].split('_')[1]),
    )
    names = sorted({'/'.join(k.split('/')[2:]) for k in blocks})
    depth = 1 + max(int(k.split('/')[1].split('_')[1]) for k in blocks)
    for name in names:
      out[f'Transformer/encoderblock/{name}'] = np.stack(
        [out.pop(f'Transformer/encoderblock_{i}/{name}') for i in range(depth)]
      )
  return {f'params/{k}': v for k, v in out.items()}


def test_vit_release_npz_drives_our_vit(tmp_path):
  model = make_vit(depth=2)
  ours = init(model)
  path = tmp_path / 'vit.npz'
  np.savez(path, **to_vit_release(ours))
  params = npz_loader.load_big_vision(str(path))
  assert_trees_equal(params, jax.tree.map(np.asarray, ours))
  np.testing.assert_array_equal(logits(model, params), logits(model, ours))


@pytest.mark.parametrize('scan', [False, True])
def test_big_vision_npz_drives_our_vit(tmp_path, scan):
  model = make_vit(depth=2)
  ours = init(model)
  # big_vision's class token gets no position embedding: ours at zero is the same function.
  ours['pos_embedding'][:, 0] = 0.0
  path = tmp_path / 'bv.npz'
  np.savez(path, **to_big_vision(ours, scan=scan))
  params = npz_loader.from_big_vision(npz_loader.load_npz(str(path)))
  assert_trees_equal(params, jax.tree.map(np.asarray, ours))
  np.testing.assert_allclose(logits(model, params), logits(model, ours), atol=1e-6)
  # And into a model with a new head and a 3 x 3 grid in one go.
  target = init(make_vit(depth=2, num_classes=3), image=12, seed=1)
  mapped, report = mapping.init_params(params, target)
  assert actions(report)['pos_embedding'] == 'resized'


def test_big_vision_map_head_names():
  head = heads.MapHead(num_heads=2, mlp_dim=MLP)
  shapes = jax.eval_shape(lambda: head.init(jax.random.key(0), jnp.zeros((1, 4, WIDTH))))
  rng = np.random.default_rng(0)
  ours = jax.tree.map(lambda x: rng.normal(size=x.shape), nn.meta.unbox(shapes['params']))
  bv = {'embedding/kernel': np.zeros((4, 4, 3, WIDTH))}
  for path, value in mapping.flatten(ours).items():
    path = re.sub('^attention/', 'MultiHeadDotProductAttention_0/', path)
    path = re.sub('^norm/', 'LayerNorm_0/', path)
    path = re.sub('^mlp/', 'MlpBlock_0/', path)
    bv[f'MAPHead_0/{path}'] = np.asarray(value)
  converted = npz_loader.from_big_vision(bv)
  assert_trees_equal(converted['map_head'], jax.tree.map(np.asarray, ours))


def test_npz_errors(tmp_path):
  with pytest.raises(
    UserError,
    match=re.escape(
      f'init_from: {tmp_path}/none.npz is not a file; give the path of a .npz checkpoint.'
    ),
  ):
    npz_loader.load_npz(str(tmp_path / 'none.npz'))
  garbage = tmp_path / 'garbage.npz'
  garbage.write_bytes(b'not a zip at all\n' * 10)
  with pytest.raises(UserError, match=f'init_from: {garbage} is not a readable .npz file \\(') as e:
    npz_loader.load_npz(str(garbage))
  assert '\n' not in str(e.value)
  assert 'pickle' not in str(e.value)  # np.load's guess (a pickle) is not the user's problem.
  single = tmp_path / 'one.npy'
  np.save(single, np.zeros(3))
  with pytest.raises(UserError, match='holds a single array, not an .npz archive'):
    npz_loader.load_npz(str(single))
  odd = tmp_path / 'odd.npz'
  np.savez(odd, foo=np.zeros(3))
  with pytest.raises(
    UserError,
    match=re.escape(f"init_from: {odd}: no 'embedding/kernel' among its 1 arrays, not a ViT"),
  ):
    npz_loader.load_big_vision(str(odd))
  np.savez(
    odd,
    **{'embedding/kernel': np.zeros(3), 'Transformer/encoderblock_0/Attention/kernel': np.zeros(3)},
  )
  with pytest.raises(
    UserError,
    match=re.escape("unknown parameter 'Transformer/encoderblock_0/Attention/kernel', not a ViT"),
  ):
    npz_loader.load_big_vision(str(odd))


def _config_file(name, arg=None):
  import importlib.util
  import pathlib

  path = pathlib.Path(__file__).parent.parent / 'configs' / name
  spec = importlib.util.spec_from_file_location(f'_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize('train', [False, True])
def test_the_upcycling_config_starts_as_the_dense_function(train):
  """configs/fashion_upcycle.py: the upcycled MoE's logits are the dense ViT's at step 0.

  Dropless top-2 with renormalised weights: every token gets w1 + w2 = 1 times
  the dense MLP, in training (capacity plays no part) and in evaluation.
  """
  from vmoe_jax.models import factory

  dense_config, moe_config = _config_file('fashion_vit.py'), _config_file('fashion_upcycle.py')
  assert moe_config.init.upcycle_noise_std == 0.0
  dense = factory.create_model(dense_config, num_classes=10)
  sparse = factory.create_model(moe_config, num_classes=10)
  assert sparse.moe.num_selected == 2 and sparse.moe.renormalize

  def random_params(model, seed):
    shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((8, 28, 28, 1)), train=False)['params']
    )
    rng = np.random.default_rng(seed)
    leaves = nn.meta.unbox(shapes)
    return jax.tree.map(lambda x: (rng.normal(size=x.shape) * 0.2).astype(x.dtype), leaves)

  source = random_params(dense, 0)
  params, _ = mapping.init_params(source, random_params(sparse, 1))
  images = jax.random.normal(jax.random.key(7), (8, 28, 28, 1))
  rngs = {'router': jax.random.key(1), 'dropout': jax.random.key(2)}

  def forward(model, p):
    return jax.jit(lambda p: model.apply({'params': p}, images, train=train, rngs=rngs)[0])(p)

  expected = forward(dense, source)
  assert np.asarray(expected).std() > 0.1
  np.testing.assert_allclose(forward(sparse, params), expected, atol=1e-4, rtol=1e-5)
