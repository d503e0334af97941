"""The models' layer forms (models/layers.py) and masks.rank_below compute what plain forms do."""
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtvae_jax import masks
from mtvae_jax import models
from mtvae_jax.models import layers


def plain_up(features, kernel, dtype=jnp.float32):
  """`up` as flax's lhs-dilated transposed convolution."""
  padding = layers.up_padding(kernel)
  return nn.ConvTranspose(features, (kernel, kernel), strides=(2, 2), padding=(padding, padding),
                          dtype=dtype)


def plain_conv(features, kernel, stride=1, use_bias=True, dtype=jnp.float32):
  """layers.Conv as flax's convolution."""
  return nn.Conv(features, (kernel, kernel), strides=stride, padding=(kernel - 1) // 2,
                 use_bias=use_bias, dtype=dtype)


@functools.partial(jax.jit, static_argnums=0)
def derivatives(module, variables, x, cotangent, tangents):
  """module(x), the gradients of <module(x), cotangent> for the variables and x, and the
  derivative of module(x) along `tangents` (for the variables and x)."""
  out, vjp = jax.vjp(module.apply, variables, x)
  return out, vjp(cotangent), jax.jvp(module.apply, (variables, x), tangents)[1]


def _close(a, b):
  """Equal to float32 rounding, which grows with the magnitude of the sums (gradients)."""
  b = np.asarray(b)
  np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(b).max()))


def _assert_same_layer(fast, plain, x, out_shape):
  """Same initial variables, outputs, gradients and forward-mode derivatives."""
  variables = fast.init(jax.random.key(1), x)
  jax.tree.map(_close, variables, plain.init(jax.random.key(1), x))
  variables = jax.tree.map(lambda v: v + 0.1, variables)  # a nonzero bias too
  cotangent = jax.random.normal(jax.random.key(2), out_shape)
  tangents = jax.tree.map(jnp.cos, (variables, x))
  fast_results = derivatives(fast, variables, x, cotangent, tangents)
  assert fast_results[0].shape == out_shape
  jax.tree.map(_close, fast_results, derivatives(plain, variables, x, cotangent, tangents))


# side 1: a grid smaller than the phases' kernels (conv_by_matmul)
@pytest.mark.parametrize('kernel,features,side', [(3, 7, 5), (4, 7, 5), (4, 3, 4), (3, 7, 1)])
def test_up_has_the_parameters_and_derivatives_of_flax_conv_transpose(kernel, features, side):
  x = jax.random.normal(jax.random.key(0), (3, side, side + 1, 4))
  _assert_same_layer(layers.up(features, kernel), plain_up(features, kernel), x,
                     (3, 2 * side, 2 * side + 2, features))


# stride 2 (conv_down's own tangent) with 3x3, 4x4 and 5x5 kernels; stride 1; 1x1 as a product;
# grids smaller than the kernel (conv_by_matmul), stride 2 and 1
@pytest.mark.parametrize('kernel,stride,use_bias,features,grid', [
    (3, 2, True, 7, (6, 8)), (4, 2, True, 7, (6, 8)), (5, 2, False, 3, (6, 8)),
    (3, 1, True, 3, (6, 8)), (1, 1, False, 7, (6, 8)), (3, 2, True, 7, (2, 4)),
    (3, 1, True, 7, (2, 6))])
def test_conv_has_the_parameters_and_derivatives_of_flax_conv(kernel, stride, use_bias, features,
                                                              grid):
  x = jax.random.normal(jax.random.key(0), (3, *grid, 4))
  _assert_same_layer(layers.Conv(features, kernel, stride, use_bias),
                     plain_conv(features, kernel, stride, use_bias), x,
                     (3, grid[0] // stride, grid[1] // stride, features))


def plain_dense(features, dtype=jnp.float32):
  """layers.Dense as flax's nn.Dense on the concatenated inputs (inside a compact method)."""
  return lambda *inputs: nn.Dense(features, dtype=dtype)(jnp.concatenate(inputs, axis=-1))


class DenseOfTwo(nn.Module):
  dense: Callable

  @nn.compact
  def __call__(self, inputs):
    return self.dense(6)(*inputs)


def test_dense_of_several_inputs_is_flax_dense_of_their_concatenation():
  inputs = (jax.random.normal(jax.random.key(0), (3, 5)), jax.random.normal(jax.random.key(1), (3, 9)))
  fast, plain = DenseOfTwo(layers.Dense), DenseOfTwo(plain_dense)
  assert jax.tree.structure(fast.init(jax.random.key(2), inputs)) == jax.tree.structure(
      plain.init(jax.random.key(2), inputs))   # Dense_0/{kernel,bias}
  _assert_same_layer(fast, plain, inputs, (3, 6))


def test_strided_conv_refuses_odd_sides():
  with pytest.raises(ValueError, match='even sides'):
    layers.conv(jnp.zeros((1, 5, 6, 2)), jnp.zeros((3, 3, 2, 4)), stride=2)


def _use_plain_layers(monkeypatch):
  monkeypatch.setattr(layers, 'up', plain_up)
  monkeypatch.setattr(layers, 'Conv', plain_conv)
  monkeypatch.setattr(layers, 'Dense', plain_dense)


def _model_inputs(shape):
  x = jax.random.uniform(jax.random.key(0), (4, *shape))
  mask = (jax.random.uniform(jax.random.key(3), (4, *shape[:2], 1)) < 0.3).astype(jnp.float32)
  return x, {'recon': None, 'recon_cond': jnp.concatenate([mask, mask * x], axis=-1)}


@pytest.mark.parametrize('model_name', ['gaussian', 'vq'])
def test_models_keep_the_parameter_tree_of_flax_layers(make_config, model_name, monkeypatch):
  config = make_config(model_name, 'multi')
  shape = (10, 10, 1)
  x, conds = _model_inputs(shape)

  def param_shapes():
    model = models.build_model(config, shape)
    variables = jax.eval_shape(functools.partial(model.init, train=False),
                               jax.random.key(1), x, conds, jax.random.key(2))
    return {jax.tree_util.keystr(path): leaf.shape
            for path, leaf in jax.tree_util.tree_leaves_with_path(variables)}

  fast = param_shapes()
  _use_plain_layers(monkeypatch)
  assert fast == param_shapes()
  assert any('ConvTranspose_0' in path for path in fast) and any('Conv_0' in path for path in fast)


def _params_and_loss(config, shape, x, conds):
  """Initial parameters of the config's model, and its training loss as a function of them."""
  model = models.build_model(config, shape)
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(1), x, conds, jax.random.key(2))

  def loss(params):
    (outputs, terms), _ = model.apply({**variables, 'params': params}, x, conds,
                                      jax.random.key(4), train=True, mutable=['batch_stats'])
    return sum(jnp.mean(t) for t in terms.values()) + sum(
        jnp.mean(jnp.square(out - x)) for out in outputs.values())

  return variables['params'], loss


# A multi model holds both kinds of decoder (none's and single's are one of them); side 10 is
# padded to the encoder's grid, and the VQ case has colour channels.
@pytest.mark.parametrize('model_name,shape', [('gaussian', (10, 10, 1)), ('vq', (12, 12, 3))])
def test_models_compute_the_loss_and_derivatives_of_flax_layers(make_config, model_name, shape,
                                                                monkeypatch):
  """The loss, its gradient and its forward-mode derivative along a fixed tangent of the
  parameters are those of flax's layers; the forward-mode derivative is <gradient, tangent>."""
  config = make_config(model_name, 'multi')
  x, conds = _model_inputs(shape)

  def loss_and_derivatives():
    params, loss = _params_and_loss(config, shape, x, conds)
    tangent = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype)).reshape(p.shape),
                           params)

    @jax.jit
    def derivatives(params):
      value, gradient = jax.value_and_grad(loss)(params)
      return value, gradient, jax.jvp(loss, (params,), (tangent,))[1], sum(
          jnp.vdot(g, t) for g, t in zip(jax.tree.leaves(gradient), jax.tree.leaves(tangent)))

    return derivatives(params)

  fast = loss_and_derivatives()
  np.testing.assert_allclose(fast[2], fast[3], rtol=1e-4)  # by jvp and by the gradient
  _use_plain_layers(monkeypatch)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), fast,
               loss_and_derivatives())


def test_rank_below_is_the_mask_of_two_argsorts_ties_included():
  rng = np.random.default_rng(0)
  for scores in (rng.integers(0, 6, (50, 40)) / 8, rng.random((50, 40), np.float32)):  # ties / none
    scores = jnp.asarray(scores, jnp.float32)
    ks = jnp.asarray(rng.integers(0, 46, 50))  # 0, some, all and more than all pixels
    expected = jnp.argsort(jnp.argsort(scores, axis=1), axis=1) < ks[:, None]
    np.testing.assert_array_equal(jax.jit(jax.vmap(masks.rank_below))(scores, ks), expected)
