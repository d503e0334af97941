"""config.train.precision: a bfloat16 train step computes what the float32 one does, within
bfloat16's rounding, and keeps a float32 state; and which states the step donates on a CPU."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import compilations, DIGITS_SHAPE
import mtvae_jax
from mtvae_jax import config as config_lib
from mtvae_jax import loop
from mtvae_jax import models
from mtvae_jax import train

# bfloat16 keeps 8 significant bits (relative rounding 2**-9 per product); through the
# network the step's loss terms stay within LOSS_RTOL of float32's, and its gradient within
# GRAD_RTOL in norm over all parameters (measured on the VQ step below: 0.3 % and 4.9 %; a
# few codes change where two codebook vectors are almost equally near).
LOSS_RTOL = 1e-2
GRAD_RTOL = 0.1


def _two_steps(config, images):
  """(state after the first step, first step's metrics, compilations of the two steps)."""
  model = models.build_model(config, DIGITS_SHAPE)
  state = train.create_train_state(config, model, DIGITS_SHAPE, jax.random.key(0))
  step = jax.jit(functools.partial(train.train_step, config=config))
  with compilations() as (compiled, _):
    first, metrics = step(state, images[0], jax.random.key(1))
    step(first, images[1], jax.random.key(1))
  return first, jax.device_get(metrics), compiled['jit(train_step)']


def _gradient(state):
  """The first step's gradient g, from AdamW's first moment (1 - b1) g, b1 = 0.9."""
  return jax.tree.map(lambda mu: mu / 0.1, state.opt_state[0].mu)


def test_bfloat16_step_is_float32_within_rounding_keeps_float32_state_and_compiles_once(
    make_config):
  images = jax.random.uniform(jax.random.key(2), (2, 64, *DIGITS_SHAPE))
  runs = {}
  for precision in ('float32', 'bfloat16'):
    config = make_config('vq', 'multi')
    config.train.precision = precision
    runs[precision] = _two_steps(config, images)
  (state32, metrics32, compiled32), (state16, metrics16, compiled16) = runs.values()
  assert compiled32 == compiled16 == 1
  leaves = jax.tree.leaves((state16.params, state16.opt_state, state16.batch_stats))
  assert {leaf.dtype for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.floating)} == {
      jnp.dtype(jnp.float32)}
  for name, value in metrics32.items():
    np.testing.assert_allclose(metrics16[name], value, rtol=LOSS_RTOL, err_msg=name)
  error = optax.tree_utils.tree_norm(jax.tree.map(jnp.subtract, _gradient(state16),
                                                  _gradient(state32)))
  assert error <= GRAD_RTOL * optax.tree_utils.tree_norm(_gradient(state32))


def test_unknown_precision_is_one_line_naming_the_choices(make_config):
  config = make_config('gaussian', 'none')
  config.train.precision = 'float16'
  with pytest.raises(mtvae_jax.UserError, match=r"^config.train.precision='float16' is not "
                     r'allowed: use one of float32, bfloat16$'):
    config_lib.validate(config)


def test_a_cpu_donates_only_a_state_with_a_leaf_above_the_mmap_threshold():
  small = {'kernel': np.empty(loop.MMAP_THRESHOLD_BYTES // 4, np.float32)}
  large = dict(small, dense=np.empty(loop.MMAP_THRESHOLD_BYTES // 4 + 1, np.float32))
  assert (loop.donates_state(small), loop.donates_state(large)) == (False, True)
