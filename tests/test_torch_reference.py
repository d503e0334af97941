"""The benchmark's PyTorch reference computes the same networks and losses as mtvae_jax."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtvae_jax import masks
from mtvae_jax import models
from mtvae_jax.models import layers

torch = pytest.importorskip('torch')
from experiments import torch_reference  # pylint: disable=wrong-import-position

SHAPE = (10, 10, 3)  # odd after one halving: exercises the input padding and the output crop


def _models(make_config, model_name, method):
  config = make_config(model_name, method)
  model = models.build_model(config, SHAPE)
  x = jax.random.uniform(jax.random.key(0), (4, *SHAPE))
  m = jnp.concatenate([x[..., :1] > 0.5, x], -1).astype(jnp.float32)
  conds = {'recon': None} if method == 'none' else {'recon': None, 'recon_cond': m}
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(1), x, conds, jax.random.key(2))
  twin = torch_reference.MODELS[model_name](config, SHAPE)
  torch_reference.load_flax(twin, variables)
  return config, model, variables, twin, x, conds


def _nchw(x):
  return torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)


def _assert_close(jax_array, torch_tensor):
  np.testing.assert_allclose(np.asarray(jax_array), torch_tensor.detach().permute(0, 2, 3, 1).numpy()
                             if torch_tensor.dim() == 4 else torch_tensor.detach().numpy(),
                             rtol=1e-4, atol=1e-5)


def test_vq_twin_computes_the_same_outputs_and_loss_terms_in_training_mode(make_config):
  _, model, variables, twin, x, conds = _models(make_config, 'vq', 'multi')
  (outputs, terms), _ = jax.jit(functools.partial(model.apply, train=True, mutable=['batch_stats']))(
      variables, x, conds, None)
  t_outputs, t_terms = twin.train()(_nchw(x), {k: None if m is None else _nchw(m)
                                               for k, m in conds.items()})
  for name, out in outputs.items():
    _assert_close(out, t_outputs[name])
  _assert_close(terms['vq'], t_terms['vq'])


def test_gaussian_twin_computes_the_same_encoder_and_decoders(make_config):
  _, model, variables, twin, x, conds = _models(make_config, 'gaussian', 'multi')
  twin.train()
  encode = lambda mdl, x: mdl.encoder(layers.pad_to(x, *mdl.padded), train=True)
  (mean, log_var), _ = jax.jit(functools.partial(model.apply, method=encode, mutable=['batch_stats']))(
      variables, x)
  t_mean, t_log_var = twin.encoder(twin.pad(_nchw(x)))
  _assert_close(mean, t_mean)
  _assert_close(log_var, t_log_var)
  decode = lambda mdl, z, m: mdl.decode(z, m, train=True)
  for m in conds.values():
    out, _ = jax.jit(functools.partial(model.apply, method=decode, mutable=['batch_stats']))(
        variables, mean, m)
    _assert_close(out, twin.decode(t_mean, None if m is None else _nchw(m)))


def test_exact_masks_are_the_same_grid_and_uniform_masks_have_k_pixels(make_config):
  config = make_config('gaussian', 'multi')
  exact = torch_reference.batch_masks(config.mask, (3, 12, 12))
  expected = masks.exact_mask(None, config.mask.num_pixels, (12, 12))[..., 0]
  np.testing.assert_array_equal(exact[:, 0].numpy(), np.broadcast_to(expected, (3, 12, 12)))
  config.mask.sampling = 'uniform'
  uniform = torch_reference.batch_masks(config.mask, (3, 12, 12))
  assert uniform.sum((1, 2, 3)).tolist() == [config.mask.num_pixels] * 3
  assert not torch.equal(uniform[0], uniform[1])


def test_bfloat16_autocast_step_is_float32_within_rounding_and_keeps_float32_parameters(
    make_config):
  images = torch.rand(8, SHAPE[2], *SHAPE[:2])
  losses, steps = [], []
  for precision in ('float32', 'bfloat16'):
    config = make_config('vq', 'multi')
    config.train.precision = precision
    torch.manual_seed(0)
    steps.append(torch_reference.TrainStep(config, SHAPE))
    losses.append(float(steps[-1](images)))
  np.testing.assert_allclose(losses[1], losses[0], rtol=1e-2)
  assert {p.dtype for p in steps[1].model.parameters()} == {torch.float32}


def test_torch_train_step_lowers_the_loss(make_config):
  config = make_config('vq', 'multi')
  step = torch_reference.TrainStep(config, SHAPE)
  images = torch.rand(8, SHAPE[2], *SHAPE[:2])
  first = float(step(images))
  for _ in range(10):
    last = float(step(images))
  assert last < first
