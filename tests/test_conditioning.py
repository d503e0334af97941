"""config.conditioning: the thesis's dense layer, unchanged, and the spatial path for m."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtvae_jax import config as config_lib
from mtvae_jax import models

SHAPES = [(8, 8, 1), (28, 28, 1), (32, 32, 3), (64, 64, 3)]
PRESETS = [('gaussian', 1), ('gaussian', 2), ('vq', 1), ('vq', 2), ('vq', 3)]


def _tiny_config(make_config, model_name, method, conditioning):
  config = make_config(model_name, method)
  config.conditioning = conditioning
  return config


def _size(tree):
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def _decoder_sizes(config, shape):
  """Parameters of decoder 1 and of the conditioned decoder of a 'multi' model, by eval_shape."""
  model = models.build_model(config, shape)
  conds = {'recon': None, 'recon_cond': jnp.zeros((1, *shape[:2], shape[2] + 1))}
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                             jnp.zeros((1, *shape)), conds, jax.random.key(1))
  return _size(variables['params']['decoder']), _size(variables['params']['cond_decoder'])


def test_spatial_conditioned_decoder_has_at_most_one_and_a_half_times_decoder_1s_parameters():
  ratios = {}
  for model_name, preset in PRESETS:
    config = config_lib.base_config(model_name, 'multi', str(preset))
    config.conditioning = 'spatial'
    for shape in SHAPES:
      plain, conditioned = _decoder_sizes(config, shape)
      ratios[f'{model_name}{preset} {shape}'] = conditioned / plain
  assert max(ratios.values()) <= 1.5, ratios
  assert min(ratios.values()) > 1.0, ratios  # m's path has parameters of its own


def _pixel_change(make_config, model_name, conditioning):
  """|output change| (24, 24) of a fresh single-decoder model when observed pixel (12, 12) flips."""
  shape = (24, 24, 1)
  model = models.build_model(_tiny_config(make_config, model_name, 'single', conditioning), shape)
  x = jax.random.uniform(jax.random.key(0), (1, *shape))
  mask = jnp.zeros((1, *shape[:2], 1)).at[:, ::4, ::4].set(1.0)
  m = jnp.concatenate([mask, mask * x], -1)
  flipped = m.at[0, 12, 12, 1].set(1.0 - m[0, 12, 12, 1])
  variables = model.init(jax.random.key(0), x, {'recon': m}, jax.random.key(1), train=False)
  z, _ = model.apply(variables, x, jax.random.key(1), train=False, method=model.encode)
  decode = jax.jit(lambda m: model.apply(variables, z, m, method=model.decode))
  return np.abs(np.asarray(decode(flipped) - decode(m)))[0, ..., 0]


@pytest.mark.parametrize('model_name', ['gaussian', 'vq'])
def test_spatial_conditioning_changes_the_output_near_a_changed_pixel_more_than_far_from_it(
    model_name, make_config):
  rows, cols = np.mgrid[:24, :24]
  distance = np.maximum(abs(rows - 12), abs(cols - 12))
  change = _pixel_change(make_config, model_name, 'spatial')
  near, far = change[distance <= 1].mean(), change[distance >= 8].mean()
  assert near > 0 and near > 10 * far, (near, far)


@pytest.mark.parametrize('model_name', ['gaussian', 'vq'])
def test_forward_mode_derivatives_pass_through_the_spatial_conditioned_decoder(
    model_name, make_config):
  shape = (9, 7, 3)
  model = models.build_model(_tiny_config(make_config, model_name, 'multi', 'spatial'), shape)
  x = jax.random.uniform(jax.random.key(0), (2, *shape))
  m = jnp.concatenate([jnp.ones_like(x[..., :1]), x], -1)
  variables = model.init(jax.random.key(0), x, {'recon': None, 'recon_cond': m},
                         jax.random.key(1), train=False)
  z, _ = model.apply(variables, x, jax.random.key(1), train=False, method=model.encode)
  decode = lambda z, m: model.apply(variables, z, m, method=model.decode)
  dz, dm = jax.random.normal(jax.random.key(2), z.shape), jnp.zeros_like(m).at[:, 4, 3].set(1.0)
  out, tangent = jax.jvp(decode, (z, m), (dz, dm))
  assert out.shape == tangent.shape == (2, *shape)
  assert float(jnp.abs(tangent).max()) > 0
  # <u, J (dz, dm)> = <J^T u, (dz, dm)>: forward and reverse mode agree.
  u = jax.random.normal(jax.random.key(3), out.shape)
  u_z, u_m = jax.vjp(decode, z, m)[1](u)
  np.testing.assert_allclose(jnp.vdot(u, tangent), jnp.vdot(u_z, dz) + jnp.vdot(u_m, dm),
                             rtol=1e-4)


# The conditioned decoder of conftest's small_config(model, 'multi') on (9, 7, 3) images before
# config.conditioning existed: its parameter shapes and statistics of its output.
DENSE_PARAMS = {
    'gaussian': {'BatchNorm_0': {'bias': (8,), 'scale': (8,)},
                 'BatchNorm_1': {'bias': (8,), 'scale': (8,)},
                 'ConvTranspose_0': {'bias': (8,), 'kernel': (3, 3, 16, 8)},
                 'ConvTranspose_1': {'bias': (8,), 'kernel': (3, 3, 8, 8)},
                 'Conv_0': {'bias': (3,), 'kernel': (3, 3, 8, 3)},
                 'Dense_0': {'bias': (96,), 'kernel': (256, 96)}},
    'vq': {'BatchNorm_0': {'bias': (8,), 'scale': (8,)},
           'ConvTranspose_0': {'bias': (8,), 'kernel': (4, 4, 16, 8)},
           'ConvTranspose_1': {'bias': (3,), 'kernel': (4, 4, 8, 3)},
           'Conv_0': {'bias': (16,), 'kernel': (3, 3, 4, 16)},
           'Dense_0': {'bias': (24,), 'kernel': (276, 24)},
           'ResidualLayer_0': {'Conv_0': {'kernel': (3, 3, 16, 16)},
                               'Conv_1': {'kernel': (1, 1, 16, 16)}}},
}
# sum of outputs, sum of (output - 0.5)**2, the first four outputs.
DENSE_OUTPUTS = {
    'gaussian': (283.9775285124779, 0.06500268790629171,
                 [0.5031484961509705, 0.49047088623046875, 0.4896332323551178, 0.4950903058052063]),
    'vq': (282.6945284605026, 0.019680989522425918,
           [0.4958714544773102, 0.4950689673423767, 0.5009270906448364, 0.5004212260246277]),
}


@pytest.mark.parametrize('model_name', ['gaussian', 'vq'])
def test_dense_conditioning_keeps_its_parameters_and_outputs(model_name, make_config):
  shape = (9, 7, 3)
  config = _tiny_config(make_config, model_name, 'multi', 'dense')
  assert config_lib.base_config(model_name, 'multi').conditioning == 'dense'
  model = models.build_model(config, shape)
  x = jax.random.uniform(jax.random.key(1), (3, *shape))
  mask = (jax.random.uniform(jax.random.key(2), (3, *shape[:2], 1)) < 0.3).astype(jnp.float32)
  conds = {'recon': None, 'recon_cond': jnp.concatenate([mask, mask * x], -1)}
  variables = model.init(jax.random.key(0), x, conds, jax.random.key(3), train=False)
  shapes = jax.tree_util.tree_map(lambda a: a.shape, variables['params']['cond_decoder'])
  assert shapes == DENSE_PARAMS[model_name]
  outputs, _ = model.apply(variables, x, conds, jax.random.key(3), train=False)
  out = np.asarray(outputs['recon_cond'], np.float64)
  total, spread, first = DENSE_OUTPUTS[model_name]
  np.testing.assert_allclose(out.sum(), total, rtol=1e-5)
  np.testing.assert_allclose(np.square(out - 0.5).sum(), spread, rtol=1e-3)
  np.testing.assert_allclose(out.reshape(-1)[:4], first, atol=1e-5)


def test_unknown_conditioning_is_a_user_error(make_config):
  config = _tiny_config(make_config, 'vq', 'multi', 'sparse')
  with pytest.raises(config_lib.UserError, match="config.conditioning='sparse'.*dense, spatial"):
    config_lib.validate(config)


@pytest.mark.parametrize('model_name', ['gaussian', 'vq'])
def test_torch_twin_computes_the_same_spatial_conditioned_decoder(model_name, make_config):
  torch = pytest.importorskip('torch')
  from experiments import torch_reference  # pylint: disable=import-outside-toplevel
  shape = (10, 10, 3)  # odd after one halving: the padding of m
  config = _tiny_config(make_config, model_name, 'multi', 'spatial')
  model = models.build_model(config, shape)
  x = jax.random.uniform(jax.random.key(0), (2, *shape))
  m = jnp.concatenate([(x[..., :1] > 0.5).astype(jnp.float32), x], -1)
  variables = model.init(jax.random.key(1), x, {'recon': None, 'recon_cond': m},
                         jax.random.key(2), train=False)
  z, _ = model.apply(variables, x, jax.random.key(3), train=False, method=model.encode)
  twin = torch_reference.MODELS[model_name](config, shape).eval()
  torch_reference.load_flax(twin, variables)
  nchw = lambda a: torch.from_numpy(np.array(a)).permute(0, 3, 1, 2)
  expected = model.apply(variables, z, m, method=model.decode)
  t_z = torch.from_numpy(np.array(z)) if z.ndim == 2 else nchw(z)
  with torch.no_grad():
    out = twin.decode(t_z, nchw(m)).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
