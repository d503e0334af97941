"""The fast forms in models/layers.py compute what the plain flax layers compute."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtvae_jax import models
from mtvae_jax.models import layers


def plain_up(features, kernel):
  """`up` as flax's lhs-dilated transposed convolution."""
  padding = layers.up_padding(kernel)
  return nn.ConvTranspose(features, (kernel, kernel), strides=(2, 2), padding=(padding, padding))


@functools.partial(jax.jit, static_argnums=0)
def output_and_grads(module, variables, x, cotangent):
  """module(x) and the gradients of <module(x), cotangent> for the variables and x."""
  out, vjp = jax.vjp(module.apply, variables, x)
  return out, vjp(cotangent)


def _close(a, b):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kernel', [3, 4])
def test_up_has_the_parameters_outputs_and_gradients_of_flax_conv_transpose(kernel):
  x = jax.random.normal(jax.random.key(0), (3, 5, 6, 4))
  fast, plain = layers.up(7, kernel), plain_up(7, kernel)
  variables = fast.init(jax.random.key(1), x)
  jax.tree.map(_close, variables, plain.init(jax.random.key(1), x))
  variables = jax.tree.map(lambda v: v + 0.1, variables)  # a nonzero bias too
  cotangent = jax.random.normal(jax.random.key(2), (3, 10, 12, 7))
  out_fast, grads_fast = output_and_grads(fast, variables, x, cotangent)
  out_plain, grads_plain = output_and_grads(plain, variables, x, cotangent)
  assert out_fast.shape == (3, 10, 12, 7)
  _close(out_fast, out_plain)
  jax.tree.map(_close, grads_fast, grads_plain)


@pytest.mark.parametrize('model_name', ['gaussian', 'vq'])
def test_models_keep_the_parameter_tree_of_flax_conv_transpose(make_config, model_name, monkeypatch):
  config = make_config(model_name, 'multi')
  shape = (10, 10, 1)
  x = jnp.zeros((2, *shape))
  conds = {'recon': None, 'recon_cond': jnp.zeros((2, *shape[:2], 2))}

  def param_shapes():
    model = models.build_model(config, shape)
    variables = jax.eval_shape(functools.partial(model.init, train=False),
                               jax.random.key(1), x, conds, jax.random.key(2))
    return {jax.tree_util.keystr(path): leaf.shape
            for path, leaf in jax.tree_util.tree_leaves_with_path(variables)}

  fast = param_shapes()
  monkeypatch.setattr(layers, 'up', plain_up)
  assert fast == param_shapes()
  assert any('ConvTranspose_0' in path for path in fast)
