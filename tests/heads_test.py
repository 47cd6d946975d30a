"""MAP head: shapes, parameter names, pooling over all tokens, order invariance."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vmoe_jax.models import heads

WIDTH, HEADS, MLP, TOKENS = 16, 4, 24, 7


HEAD = heads.MapHead(num_heads=HEADS, mlp_dim=MLP)
APPLY = jax.jit(HEAD.apply)


@functools.cache
def _init():
  x = jax.random.normal(jax.random.key(1), (3, TOKENS, WIDTH))
  return jax.jit(HEAD.init)(jax.random.key(0), x)['params'], x


def init_head():
  params, x = _init()
  return HEAD, params, x


def flat_shapes(tree):
  return {
    '/'.join(k.key for k in path): leaf.shape
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def test_output_shape_and_dtype():
  head, params, x = init_head()
  out = APPLY({'params': params}, x)
  assert out.shape == (3, WIDTH)
  assert out.dtype == jnp.float32
  head16 = heads.MapHead(num_heads=HEADS, mlp_dim=MLP, dtype=jnp.bfloat16)
  assert jax.jit(head16.apply)({'params': params}, x).dtype == jnp.bfloat16


def test_parameter_names_and_shapes():
  _, params, _ = init_head()
  d, h = WIDTH, HEADS
  assert flat_shapes(nn.meta.unbox(params)) == {
    'probe': (1, 1, d),
    'attention/query/kernel': (d, h, d // h),
    'attention/query/bias': (h, d // h),
    'attention/key/kernel': (d, h, d // h),
    'attention/key/bias': (h, d // h),
    'attention/value/kernel': (d, h, d // h),
    'attention/value/bias': (h, d // h),
    'attention/out/kernel': (h, d // h, d),
    'attention/out/bias': (d,),
    'norm/scale': (d,),
    'norm/bias': (d,),
    'mlp/Dense_0/kernel': (d, MLP),
    'mlp/Dense_0/bias': (MLP,),
    'mlp/Dense_1/kernel': (MLP, d),
    'mlp/Dense_1/bias': (d,),
  }


def test_every_token_changes_the_output():
  head, params, x = init_head()
  apply = lambda x: APPLY({'params': params}, x)
  out = apply(x)
  for token in range(TOKENS):
    new = apply(x.at[0, token].add(1.0))
    assert np.abs(np.asarray(new[0] - out[0])).max() > 1e-4, token
    # Other images are untouched: the head pools within an image.
    np.testing.assert_array_equal(new[1:], out[1:])


def test_permuting_tokens_leaves_the_output_unchanged():
  head, params, x = init_head()
  out = APPLY({'params': params}, x)
  perm = np.random.default_rng(0).permutation(TOKENS)
  np.testing.assert_allclose(APPLY({'params': params}, x[:, perm]), out, atol=1e-6)


def test_matches_a_hand_written_attention_pooling():
  head, params, x = init_head()
  p = params
  probe = p['probe'][0]  # (1, D)
  att = p['attention']
  q = jnp.einsum('qd,dhk->qhk', probe, att['query']['kernel']) + att['query']['bias']
  k = jnp.einsum('btd,dhk->bthk', x, att['key']['kernel']) + att['key']['bias']
  v = jnp.einsum('btd,dhk->bthk', x, att['value']['kernel']) + att['value']['bias']
  logits = jnp.einsum('qhk,bthk->bhqt', q, k) / np.sqrt(WIDTH // HEADS)
  weights = jax.nn.softmax(logits, axis=-1)
  y = jnp.einsum('bhqt,bthk->bqhk', weights, v)
  y = jnp.einsum('bqhk,hkd->bqd', y, att['out']['kernel']) + att['out']['bias']
  mean = y.mean(-1, keepdims=True)
  var = ((y - mean) ** 2).mean(-1, keepdims=True)
  z = (y - mean) / jnp.sqrt(var + 1e-6) * p['norm']['scale'] + p['norm']['bias']
  mlp = p['mlp']
  z = nn.gelu(z @ mlp['Dense_0']['kernel'] + mlp['Dense_0']['bias'])
  z = z @ mlp['Dense_1']['kernel'] + mlp['Dense_1']['bias']
  expected = (y + z)[:, 0]
  np.testing.assert_allclose(APPLY({'params': params}, x), expected, atol=1e-5)
