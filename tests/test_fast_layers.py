"""Fast forms (models/layers.py, onednn.py, masks.py) compute what plain forms do; CPU kernels."""
import functools
import os
import subprocess
import sys
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import device_env
import mtvae_jax
from mtvae_jax import masks
from mtvae_jax import models
from mtvae_jax import train
from mtvae_jax.models import layers
from mtvae_jax.models import onednn


def plain_up(features, kernel):
  """`up` as flax's lhs-dilated transposed convolution."""
  padding = layers.up_padding(kernel)
  return nn.ConvTranspose(features, (kernel, kernel), strides=(2, 2), padding=(padding, padding))


def plain_conv(features, kernel, stride=1, use_bias=True):
  """layers.Conv as flax's convolution."""
  return nn.Conv(features, (kernel, kernel), strides=stride, padding=(kernel - 1) // 2,
                 use_bias=use_bias)


@functools.partial(jax.jit, static_argnums=0)
def output_and_grads(module, variables, x, cotangent):
  """module(x) and the gradients of <module(x), cotangent> for the variables and x."""
  out, vjp = jax.vjp(module.apply, variables, x)
  return out, vjp(cotangent)


def _close(a, b):
  """Equal to float32 rounding, which grows with the magnitude of the sums (gradients)."""
  b = np.asarray(b)
  np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(b).max()))


@pytest.fixture(params=['xla', 'onednn'])
def convolutions(request, monkeypatch):
  """Runs a test with XLA's convolutions, then with oneDNN's where this jaxlib has them."""
  if request.param == 'onednn' and not onednn.supported():
    pytest.skip('no oneDNN convolutions for this jaxlib (models/onednn.py)')
  monkeypatch.setenv('MTVAE_JAX_ONEDNN', '1' if request.param == 'onednn' else '0')
  jax.clear_caches()  # programs traced under the other setting
  yield request.param
  jax.clear_caches()


def _assert_same_layer(fast, plain, x, out_shape):
  """Same initial variables, outputs and gradients (for the variables and x)."""
  variables = fast.init(jax.random.key(1), x)
  jax.tree.map(_close, variables, plain.init(jax.random.key(1), x))
  variables = jax.tree.map(lambda v: v + 0.1, variables)  # a nonzero bias too
  cotangent = jax.random.normal(jax.random.key(2), out_shape)
  out_fast, grads_fast = output_and_grads(fast, variables, x, cotangent)
  out_plain, grads_plain = output_and_grads(plain, variables, x, cotangent)
  assert out_fast.shape == out_shape
  _close(out_fast, out_plain)
  jax.tree.map(_close, grads_fast, grads_plain)


# by phases (kernel gradient as conv_down's, or per phase from 16x16 on) / lhs-dilated
@pytest.mark.parametrize('kernel,features,side', [(3, 7, 5), (4, 7, 5), (3, 5, 16), (4, 3, 5)])
def test_up_has_the_parameters_outputs_and_gradients_of_flax_conv_transpose(kernel, features, side,
                                                                          convolutions):
  x = jax.random.normal(jax.random.key(0), (3, side, side + 1, 4))
  _assert_same_layer(layers.up(features, kernel), plain_up(features, kernel), x,
                     (3, 2 * side, 2 * side + 2, features))


# features < 4 input channels: the stride-1 kernel gradient with swapped operands
@pytest.mark.parametrize('kernel,stride,use_bias,features', [
    (3, 2, True, 7), (4, 2, True, 7), (3, 1, True, 7), (3, 1, True, 3), (5, 1, False, 2),
    (1, 1, False, 7), (3, 1, False, 7)])
def test_conv_has_the_parameters_outputs_and_gradients_of_flax_conv(kernel, stride, use_bias,
                                                                   features, convolutions):
  x = jax.random.normal(jax.random.key(0), (3, 6, 8, 4))
  _assert_same_layer(layers.Conv(features, kernel, stride, use_bias),
                     plain_conv(features, kernel, stride, use_bias), x,
                     (3, 6 // stride, 8 // stride, features))


def plain_dense(features):
  """layers.Dense as flax's nn.Dense on the concatenated inputs (inside a compact method)."""
  return lambda *inputs: nn.Dense(features)(jnp.concatenate(inputs, axis=-1))


class DenseOfTwo(nn.Module):
  dense: Callable

  @nn.compact
  def __call__(self, z, m):
    return self.dense(6)(z, m)


def test_dense_of_several_inputs_is_flax_dense_of_their_concatenation():
  z = jax.random.normal(jax.random.key(0), (3, 5))
  m = jax.random.normal(jax.random.key(1), (3, 9))
  fast, plain = DenseOfTwo(layers.Dense), DenseOfTwo(plain_dense)
  variables = plain.init(jax.random.key(2), z, m)
  fast_variables = fast.init(jax.random.key(2), z, m)
  assert jax.tree.structure(fast_variables) == jax.tree.structure(variables)   # Dense_0/{kernel,bias}
  jax.tree.map(_close, fast_variables, variables)
  variables = jax.tree.map(lambda v: v + 0.1, variables)
  cotangent = jax.random.normal(jax.random.key(3), (3, 6))
  out_fast, vjp_fast = jax.vjp(fast.apply, variables, z, m)
  out_plain, vjp_plain = jax.vjp(plain.apply, variables, z, m)
  _close(out_fast, out_plain)
  jax.tree.map(_close, vjp_fast(cotangent), vjp_plain(cotangent))  # m's gradient too


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


@pytest.mark.parametrize('model_name,shape', [('gaussian', (10, 10, 1)), ('vq', (12, 12, 3))])
def test_models_compute_the_loss_and_gradients_of_flax_layers(make_config, model_name, shape,
                                                             convolutions, monkeypatch):
  config = make_config(model_name, 'multi')
  x, conds = _model_inputs(shape)

  def loss_and_grads():
    model = models.build_model(config, shape)
    variables = jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(1), x, conds, jax.random.key(2))

    def loss(params):
      (outputs, terms), _ = model.apply({**variables, 'params': params}, x, conds,
                                        jax.random.key(4), train=True, mutable=['batch_stats'])
      return sum(jnp.mean(t) for t in terms.values()) + sum(
          jnp.mean(jnp.square(out - x)) for out in outputs.values())

    compiled = jax.jit(jax.value_and_grad(loss)).lower(variables['params']).compile()
    return compiled(variables['params']), compiled.as_text()

  fast, text = loss_and_grads()
  assert ('__onednn$convolution' in text) == (convolutions == 'onednn')
  _use_plain_layers(monkeypatch)
  plain, _ = loss_and_grads()
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), fast, plain)


def test_rank_below_is_the_mask_of_two_argsorts_ties_included():
  rng = np.random.default_rng(0)
  for scores in (rng.integers(0, 6, (50, 40)) / 8, rng.random((50, 40), np.float32)):  # ties / none
    scores = jnp.asarray(scores, jnp.float32)
    ks = jnp.asarray(rng.integers(0, 46, 50))  # 0, some, all and more than all pixels
    expected = jnp.argsort(jnp.argsort(scores, axis=1), axis=1) < ks[:, None]
    np.testing.assert_array_equal(jax.jit(jax.vmap(masks.rank_below))(scores, ks), expected)


@pytest.mark.parametrize('before,after', [
    (None, mtvae_jax.CPU_CONVOLUTION_FLAG),
    ('--xla_force_host_platform_device_count=4',
     f'--xla_force_host_platform_device_count=4 {mtvae_jax.CPU_CONVOLUTION_FLAG}'),
    ('--xla_cpu_experimental_ynn_fusion_type=', '--xla_cpu_experimental_ynn_fusion_type='),
])
def test_import_adds_the_cpu_convolution_flag_unless_xla_flags_names_it(before, after, monkeypatch):
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(xla_bridge, 'backends_are_initialized', lambda: False)
  if before is None:
    monkeypatch.delenv('XLA_FLAGS', raising=False)
  else:
    monkeypatch.setenv('XLA_FLAGS', before)
  assert mtvae_jax.use_fast_cpu_convolutions() == (before != after)
  assert os.environ['XLA_FLAGS'] == after


def test_the_flag_is_left_out_once_a_backend_runs(monkeypatch):
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(xla_bridge, 'backends_are_initialized', lambda: True)
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  assert not mtvae_jax.use_fast_cpu_convolutions() and 'XLA_FLAGS' not in os.environ


@pytest.mark.skipif(mtvae_jax.CPU_CONVOLUTION_FLAG not in os.environ.get('XLA_FLAGS', ''),
                    reason='XLA_FLAGS chose the CPU convolutions')
def test_cpu_convolutions_run_outside_ynnpack(monkeypatch):
  monkeypatch.setattr(onednn, 'enabled', lambda: False)
  conv = jax.jit(functools.partial(layers.conv, stride=1)).lower(
      jnp.zeros((128, 8, 8, 256)), jnp.zeros((3, 3, 256, 256))).compile().as_text()
  assert 'convolution(' in conv and '__ynn_fusion' not in conv


def _compiled_text(fn, *args):
  return jax.jit(fn).lower(*args).compile().as_text()


# 3x3 `same`, `down`'s stride 2, and an `up` phase's uneven padding
@pytest.mark.parametrize('convolutions', ['onednn'], indirect=True)
@pytest.mark.parametrize('x_shape,kernel_shape,strides,padding', [
    ((3, 7, 7, 8), (3, 3, 8, 16), (1, 1), ((1, 1), (1, 1))),
    ((3, 8, 8, 4), (4, 4, 4, 8), (2, 2), ((1, 1), (1, 1))),
    ((3, 7, 7, 8), (2, 2, 8, 5), (1, 1), ((1, 0), (0, 1))),
])
def test_onednn_conv_is_xla_conv_with_its_gradients_and_batching(x_shape, kernel_shape, strides,
                                                                  padding, convolutions):
  keys = jax.random.split(jax.random.key(0), 3)
  x, kernel = jax.random.normal(keys[0], x_shape), jax.random.normal(keys[1], kernel_shape)
  fast = functools.partial(onednn.conv, strides=strides, padding=padding)
  plain = functools.partial(onednn.xla_conv, strides=strides, padding=padding)
  assert '__onednn$convolution' in _compiled_text(fast, x, kernel)
  out, vjp = jax.vjp(plain, x, kernel)
  cotangent = jax.random.normal(keys[2], out.shape)
  grads = jax.jit(lambda x, k: jax.vjp(fast, x, k)[1](cotangent))(x, kernel)
  _close(jax.jit(fast)(x, kernel), out)
  jax.tree.map(_close, grads, vjp(cotangent))
  _close(jax.jit(lambda x, k: jax.jvp(fast, (x, k), (k.sum() * x, x.sum() * k))[1])(x, kernel),
         jax.jvp(plain, (x, kernel), (kernel.sum() * x, x.sum() * kernel))[1])
  _close(jax.jit(jax.vmap(fast, in_axes=(1, None), out_axes=1))(x[:, None], kernel)[:, 0], out)
  _close(jax.jit(jax.vmap(fast, in_axes=(None, 0)))(x, kernel[None])[0], out)


@pytest.mark.parametrize('convolutions', ['onednn'], indirect=True)
@pytest.mark.parametrize('transpose_a,transpose_b', [(False, False), (False, True), (True, False),
                                                     (True, True)])
def test_onednn_matmul_is_the_product_with_its_gradients(transpose_a, transpose_b, convolutions):
  keys = jax.random.split(jax.random.key(0), 3)
  m, k, n = 96, 160, 640  # 2 m k n = 19.7 MFLOP, above onednn.MIN_MATMUL_FLOPS
  a = jax.random.normal(keys[0], (k, m) if transpose_a else (m, k))
  b = jax.random.normal(keys[1], (n, k) if transpose_b else (k, n))
  fast = functools.partial(onednn.matmul, transpose_a=transpose_a, transpose_b=transpose_b)
  plain = functools.partial(onednn.xla_matmul, transpose_a=transpose_a, transpose_b=transpose_b)
  cotangent = jax.random.normal(keys[2], (m, n))
  grads = lambda a, b: jax.vjp(fast, a, b)[1](cotangent)
  assert _compiled_text(grads, a, b).count('__onednn$matmul') == 2
  _close(jax.jit(fast)(a, b), plain(a, b))
  jax.tree.map(_close, jax.jit(grads)(a, b), jax.vjp(plain, a, b)[1](cotangent))
  small_a = a[:, :8] if transpose_a else a[:8]  # m = 8: too small a product
  assert '__onednn$matmul' not in _compiled_text(fast, small_a, b)


@pytest.mark.parametrize('convolutions', ['onednn'], indirect=True)
def test_train_steps_with_onednn_repeat_bit_for_bit(make_config, convolutions):
  config = make_config('vq', 'single')
  shape = (8, 8, 1)
  model = models.build_model(config, shape)
  images = jax.random.uniform(jax.random.key(1), (16, *shape))
  initial = train.create_train_state(config, model, shape, jax.random.key(0))
  step = jax.jit(functools.partial(train.train_step, config=config)).lower(
      initial, images, jax.random.key(2)).compile()
  assert '__onednn$convolution' in step.as_text()

  def params_after_two_steps():
    state = initial
    for _ in range(2):
      state, _ = step(state, images, jax.random.key(2))
    return jax.tree.leaves(state.params)

  for a, b in zip(params_after_two_steps(), params_after_two_steps()):
    np.testing.assert_array_equal(a, b)


def test_mtvae_jax_onednn_0_keeps_xla_convolutions(monkeypatch):
  monkeypatch.setenv('MTVAE_JAX_ONEDNN', '0')
  text = _compiled_text(functools.partial(layers.conv, stride=2), jnp.zeros((2, 8, 8, 4)),
                        jnp.zeros((4, 4, 4, 8)))
  assert '__onednn$convolution' not in text and 'convolution(' in text


@pytest.mark.skipif(not onednn.supported(), reason='no oneDNN convolutions for this jaxlib')
def test_programs_over_several_devices_keep_xla_convolutions():
  code = (
      'import jax, jax.numpy as jnp, numpy as np, functools\n'
      'from jax.sharding import Mesh, NamedSharding, PartitionSpec\n'
      'from mtvae_jax.models import layers\n'
      "mesh = Mesh(np.array(jax.devices()), ('d',))\n"
      "x = jax.device_put(jnp.ones((4, 8, 8, 4)), NamedSharding(mesh, PartitionSpec('d')))\n"
      'f = jax.jit(functools.partial(layers.conv, stride=2))\n'
      'print(f.lower(x, jnp.ones((4, 4, 4, 8))).compile().as_text())\n')
  env = dict(device_env(2), MTVAE_JAX_ONEDNN='1')
  text = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                        check=True).stdout
  assert 'convolution(' in text and '__onednn$convolution' not in text
