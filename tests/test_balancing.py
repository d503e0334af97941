"""Loss balancing: fixed weights and SoftAdapt, alone, in the train step and in a run."""
import json

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import compilations
from conftest import small_config
from mtvae_jax import balancing
from mtvae_jax import config as config_lib
from mtvae_jax import data
from mtvae_jax import losses
from mtvae_jax import models
from mtvae_jax import train
from mtvae_jax.errors import UserError
from conftest import run_main

NAMES = ('recon', 'recon_cond', 'kl')  # the terms of a multi-decoder Gaussian VAE
# Per-step losses of NAMES; with window = update_every = 2 the weights change after
# steps 4 and 6, from the 2-step means (4, 2, 10) -> (3, 2, 12) -> (1.5, 3, 12).
HISTORY = np.array([[4, 2, 10], [4, 2, 10], [3, 2, 12], [3, 2, 12], [1, 3, 12], [2, 3, 12]],
                   np.float32)


def softadapt_config(variant='plain', beta=0.5, total=1.0, terms=(), window=2, update_every=2,
                     scale='total'):
  config = config_lib.base_config('gaussian', 'multi')
  config.loss.balancing = 'softadapt'
  config.loss.softadapt.update(variant=variant, beta=beta, total=total, terms=terms,
                               window=window, update_every=update_every, scale=scale)
  config_lib.validate(config)
  return config


def replay(config, history):
  """The balancing states after each step of `history` (steps, len(NAMES))."""
  update = jax.jit(lambda state, step_losses: balancing.update(state, step_losses, config))
  state, states = balancing.init(config), []
  for row in history:
    state = update(state, dict(zip(NAMES, jnp.asarray(row))))
    states.append(state)
  return states


def weight_vector(state, names=NAMES):
  return np.array([state.weights[name] for name in names])


def by_hand(variant, slopes, means, beta, total):
  """SoftAdapt's weights written out for each variant; `total` a number or one factor per term."""
  slopes, means = np.asarray(slopes, np.float64), np.asarray(means, np.float64)
  if variant == 'normalized':
    slopes = slopes / np.abs(slopes).sum()
  numerators = np.exp(beta * slopes) * (means if variant == 'loss_weighted' else 1.0)
  return total * numerators / numerators.sum()


@pytest.mark.parametrize('scale,total', [('total', 1.0), ('total', 3.0), ('coefficients', 3.0)])
@pytest.mark.parametrize('variant', list(balancing.VARIANTS))
def test_softadapt_weights_match_a_hand_computed_update(variant, scale, total):
  config = softadapt_config(variant, beta=0.5, total=total, scale=scale)
  # 'coefficients': K c_t per term (K = 3), so equal shares give the fixed weights back
  factors = (np.full(3, total) if scale == 'total'
             else 3 * np.array([config.loss.weights[name] for name in NAMES]))
  states = replay(config, HISTORY)
  for step in (0, 1, 2):  # no update until two window means exist
    np.testing.assert_allclose(weight_vector(states[step]), factors / 3, rtol=1e-6)
  after_4 = by_hand(variant, [3 - 4, 2 - 2, 12 - 10], [3, 2, 12], 0.5, factors)
  np.testing.assert_allclose(weight_vector(states[3]), after_4, rtol=1e-5)
  np.testing.assert_allclose(weight_vector(states[4]), after_4, rtol=1e-5)  # kept between updates
  after_6 = by_hand(variant, [1.5 - 3, 3 - 2, 12 - 12], [1.5, 3, 12], 0.5, factors)
  np.testing.assert_allclose(weight_vector(states[5]), after_6, rtol=1e-5)
  np.testing.assert_allclose((weight_vector(states[5]) / factors).sum(), 1.0, rtol=1e-5)


def test_window_and_update_period_are_independent():
  # window 3, update every 2: the first full window at an update is steps 2-4, the next 4-6
  history = np.array([[1, 1, 1], [2, 1, 1], [3, 1, 1], [4, 1, 2], [8, 1, 3], [6, 1, 1]],
                     np.float32)
  states = replay(softadapt_config(beta=1.0, window=3, update_every=2), history)
  np.testing.assert_allclose(weight_vector(states[4]), np.full(3, 1 / 3), rtol=1e-6)
  expected = by_hand('plain', [6 - 3, 1 - 1, 2 - 4 / 3], [6, 1, 2], 1.0, 1.0)
  np.testing.assert_allclose(weight_vector(states[5]), expected, rtol=1e-5)


@pytest.mark.parametrize('variant', list(balancing.VARIANTS))
def test_a_term_whose_loss_rises_gets_more_weight(variant):
  history = np.array([[1.0, 1.0, 1.0]] * 2 + [[0.9, 0.95, 1.1]] * 2, np.float32)
  weights = weight_vector(replay(softadapt_config(variant), history)[-1])
  assert weights[2] > 1 / 3 > weights[0]
  assert weights[2] > weights[1] > weights[0]


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(
    slopes=st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=4),
    beta=st.floats(-10, 10), variant=st.sampled_from(list(balancing.VARIANTS)))
def test_softadapt_shares_are_positive_and_sum_to_one(slopes, beta, variant):
  slopes = jnp.asarray(slopes, jnp.float32)
  means = jnp.linspace(0.5, 50, len(slopes))
  shares = balancing.softadapt_shares(slopes, means, variant=variant, beta=beta)
  assert np.all(np.asarray(shares) >= 0)
  assert float(jnp.sum(shares)) == pytest.approx(1.0, rel=1e-4)


def test_terms_outside_the_softadapt_set_keep_their_fixed_weights():
  config = softadapt_config(beta=1.0, terms=('recon', 'recon_cond'))
  state = replay(config, HISTORY)[-1]
  assert float(state.weights['kl']) == pytest.approx(config.loss.weights.kl)
  np.testing.assert_allclose(weight_vector(state, NAMES[:2]),
                             by_hand('plain', [-1.5, 1], [1.5, 3], 1.0, 1.0), rtol=1e-5)


def test_fixed_balancing_keeps_the_configured_weights_of_the_method_terms():
  config = config_lib.base_config('vq', 'single')
  state = balancing.init(config)
  state = balancing.update(state, {'recon': jnp.float32(2.0), 'vq': jnp.float32(3.0)}, config)
  assert {k: float(v) for k, v in state.weights.items()} == {'recon': 1.0, 'vq': 1.0}


@pytest.mark.parametrize('key,value,message', [
    ('balancing', 'gradnorm', "config.loss.balancing='gradnorm' is not allowed: use one of fixed"),
    ('softadapt.variant', 'max', "config.loss.softadapt.variant='max' is not allowed"),
    ('softadapt.terms', ('recon', 'recon_cond'), 'method=single from recon, kl'),
    ('softadapt.terms', ('kl', 'kl'), "terms=\\('kl', 'kl'\\) is not allowed"),
    ('softadapt.update_every', 0, 'config.loss.softadapt.update_every=0 is not allowed'),
    ('softadapt.window', 0, 'config.loss.softadapt.window=0 is not allowed'),
    ('softadapt.total', -1.0, 'config.loss.softadapt.total=-1.0 is not allowed'),
])
def test_bad_balancing_settings_are_refused(key, value, message):
  config = config_lib.base_config('gaussian', 'single')
  section, _, name = key.rpartition('.')
  (config.loss[section] if section else config.loss)[name] = value
  with pytest.raises(UserError, match=message):
    config_lib.validate(config)


@pytest.fixture(scope='module')
def softadapt_steps():
  """Five jitted train steps of a small multi-decoder VAE, weights updated after every step."""
  config = small_config('gaussian', 'multi')
  config.loss.balancing = 'softadapt'
  config.loss.softadapt.update(window=1, update_every=1)
  splits = data.load(config.data, config.seed)
  model = models.build_model(config, splits.train.shape[1:])
  state = train.create_train_state(config, model, splits.train.shape[1:], jax.random.key(0))
  batches = [splits.train[i * 64:(i + 1) * 64] for i in range(5)]
  key = jax.random.key(1)

  @jax.jit
  def softadapt_step(state, batch, key):
    return train.train_step(state, batch, key, config=config)

  records = []
  with compilations() as (compiled, _):
    for batch in batches:
      weights = jax.device_get(state.balancing.weights)
      state, metrics = softadapt_step(state, batch, key)
      records.append((weights, jax.device_get(metrics)))
  return compiled, records


def test_train_step_compiles_once_while_softadapt_moves_the_weights(softadapt_steps):
  compiled, records = softadapt_steps
  weights = np.array([[w[name] for name in NAMES] for w, _ in records])
  fixed = np.array([1.0, 1.0, 1e-3])  # the base config's W1, W2 and beta
  assert np.abs(weights[-1] / weights[1] - 1).max() > 1e-4
  np.testing.assert_allclose((weights / (3 * fixed)).sum(axis=1), 1.0, rtol=1e-5)
  assert compiled['jit(softadapt_step)'] == 1


def test_train_step_loss_uses_the_weights_in_force(softadapt_steps):
  _, records = softadapt_steps
  for weights, metrics in records:
    terms = {name: metrics[f'{name}_loss'] for name in NAMES}
    assert metrics['loss'] == pytest.approx(float(losses.weighted_sum(terms, weights)), rel=1e-5)


def test_history_logs_the_moving_weights_and_validation_keeps_fixed_weights(tmp_path):
  config = small_config('vq', 'single', num_epochs=2)
  config.loss.balancing = 'softadapt'
  config.loss.softadapt.update(window=2, update_every=2)
  train.train_and_evaluate(config, tmp_path)
  history = [json.loads(line) for line in (tmp_path / 'history.jsonl').read_text().splitlines()]
  names = ('recon', 'vq')
  weights = np.array([[h[f'weights/{name}'] for name in names] for h in history])
  np.testing.assert_allclose(weights.sum(axis=1), 2.0, rtol=1e-5)  # K c_t a_t with c = (1, 1)
  assert np.abs(weights - 1).max() > 1e-3  # moved from the fixed weights of equal shares
  names += ('recon_cond',)  # validation also scores the conditioned reconstruction
  fixed = config.loss.weights
  for h in history:
    val = {name: h[f'val/{name}_loss'] for name in names}
    assert h['val/loss'] == pytest.approx(losses.weighted_sum(val, fixed), rel=1e-5)


def test_softadapt_keeps_the_gaussian_multidecoder_latent_alive(tmp_path):
  """SoftAdapt scaled by the fixed coefficients trains like them; shares scaled by a common
  total let the per-image KL outweigh the per-pixel MSE and the KL collapses (to ~0.1 here)."""
  config = small_config('gaussian', 'multi', num_epochs=3)
  config.loss.balancing = 'softadapt'
  metrics = train.train_and_evaluate(config, tmp_path)
  assert metrics['kl_loss'] > 1.0
  assert metrics['active_units'] == config.gaussian.latent_dim
  assert metrics['recon_loss'] < 0.09  # about 0.10 when collapsed


def test_bad_balancing_flag_ends_the_command_line_with_one_line():
  result = run_main('--config=configs/vq_multi.py', '--config.loss.softadapt.variant=fast')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      "error: config.loss.softadapt.variant='fast' is not allowed: "
      'use one of plain, normalized, loss_weighted')
