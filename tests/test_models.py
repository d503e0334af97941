import chex
import jax
import jax.numpy as jnp
import pytest

from mtvae_jax import config as config_lib
from mtvae_jax import models

SHAPES = [(8, 8, 1), (28, 28, 1), (32, 32, 3), (64, 64, 3)]


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('model_name,preset', [('gaussian', 1), ('gaussian', 2), ('vq', 1),
                                               ('vq', 2), ('vq', 3)])
@pytest.mark.parametrize('method', ['none', 'multi', 'single'])
def test_every_model_outputs_the_input_shape(shape, model_name, preset, method):
  config = config_lib.base_config(model_name, method, str(preset))
  model = models.build_model(config, shape)
  x = jnp.zeros((2, *shape))
  m = jnp.zeros((2, *shape[:2], shape[2] + 1))
  conds = {'recon': None} if method == 'none' else {'recon': None, 'recon_cond': m}
  (outputs, terms), variables = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x, conds, jax.random.key(1),
                                       train=True), x)
  assert set(outputs) == set(conds)
  for out in outputs.values():
    chex.assert_shape(out, (2, *shape))
  assert set(terms) == {models.REGULARIZER[model_name]}
  chex.assert_shape(list(terms.values()), (2,))
  decoders = {k for k in variables['params'] if 'decoder' in k}
  assert decoders == {'none': {'decoder'}, 'multi': {'decoder', 'cond_decoder'},
                      'single': {'cond_decoder'}}[method]


def test_outputs_are_pixel_values_in_unit_interval():
  config = config_lib.base_config('gaussian', 'multi', 'digits')
  config.gaussian.hidden_sizes = (4, 8)
  model = models.build_model(config, (8, 8, 1))
  x = jax.random.uniform(jax.random.key(0), (3, 8, 8, 1))
  conds = {'recon': None, 'recon_cond': jnp.ones((3, 8, 8, 2))}
  (outputs, _), _ = model.init_with_output(jax.random.key(0), x, conds, jax.random.key(1),
                                          train=False)
  for out in outputs.values():
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_conditioned_decoder_depends_on_m_and_shares_z():
  config = config_lib.base_config('vq', 'multi', 'digits')
  config.vq.hidden_sizes = (4, 8)
  model = models.build_model(config, (8, 8, 1))
  x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 1))
  m1 = jnp.zeros((2, 8, 8, 2))
  m2 = jnp.ones((2, 8, 8, 2))
  conds = {'a': m1, 'b': m2, 'plain': None}
  (outputs, _), _ = model.init_with_output(jax.random.key(0), x, conds, None, train=False)
  assert float(jnp.abs(outputs['a'] - outputs['b']).max()) > 0
