"""The gated PixelCNN prior: causality, exact sampling, baselines, command-line errors.

Training the prior on a trained VQ run is tested end to end in test_generate.py.
"""
import itertools
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import compilations
from conftest import small_config
from mtvae_jax import prior
from mtvae_jax.models import pixelcnn

ROOT = pathlib.Path(__file__).resolve().parents[1]


def cli(*args):
  return subprocess.run([sys.executable, '-m', 'experiments.prior', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_masked_convolutions_are_causal_and_see_every_earlier_position():
  # two layers of 3x3 kernels reach two rows up and two columns across: all of a 3x3 grid
  model = pixelcnn.GatedPixelCNN(num_codes=3, features=16, num_layers=2, kernel_size=3)
  height = width = 3
  params = model.init(jax.random.key(0), jnp.zeros((1, height, width), jnp.int32))['params']
  inputs = jax.random.uniform(jax.random.key(1), (1, height, width, 3))
  logits = lambda x: model.apply({'params': params}, x, method=model.logits)
  jacobian = jax.jit(jax.jacrev(logits))(inputs)
  # depends[p, q]: does the output at raster position p change with the input at q?
  depends = np.abs(np.asarray(jacobian)).sum(axis=(0, 3, 4, 7)).reshape(9, 9) > 0
  np.testing.assert_array_equal(depends, np.tri(9, k=-1, dtype=bool))


def test_sampling_matches_the_models_conditional_distribution():
  num_codes, grid = 2, (2, 2)
  model = pixelcnn.GatedPixelCNN(num_codes=num_codes, features=8, num_layers=2, kernel_size=3)
  params = model.init(jax.random.key(0), jnp.zeros((1, *grid), jnp.int32))['params']
  params = jax.tree.map(lambda p: 3.0 * p, params)  # peaked, dependent conditionals
  every_grid = jnp.array(list(itertools.product(range(num_codes), repeat=4))).reshape(-1, *grid)
  logits = jax.jit(model.apply)({'params': params}, every_grid)

  def exact(temperature):  # prod_i softmax(logits_i / T)[c_i], valid since the model is causal
    log_p = jax.nn.log_softmax(logits / temperature)
    picked = jnp.take_along_axis(log_p, every_grid[..., None], axis=-1)
    return np.exp(np.asarray(picked).sum(axis=(1, 2, 3)))

  sample = prior.sampler(model)
  num = 20_000
  draws = [(temperature, jax.random.key(seed)) for temperature, seed in ((1.0, 1), (0.5, 2))]
  with compilations() as (compiled, _):
    draws = [(temperature, np.asarray(sample(params, key, (num, *grid), temperature)))
             for temperature, key in draws]
  assert sum(compiled.values()) == 1, compiled  # a new temperature does not recompile
  for temperature, codes in draws:
    index = (codes.reshape(num, -1) * num_codes ** np.arange(3, -1, -1)).sum(axis=1)
    empirical = np.bincount(index, minlength=num_codes ** 4) / num
    assert 0.5 * np.abs(empirical - exact(temperature)).sum() < 0.03
  assert 0.5 * np.abs(exact(1.0) - exact(0.5)).sum() > 0.1  # the check above can tell them apart


def test_baselines_are_uniform_and_smoothed_training_frequencies():
  assert prior.uniform_bits_per_code(8) == 3.0
  train_codes = np.array([[[0, 0], [0, 1]]])
  test_codes = np.array([[[0, 1], [2, 2]]])
  q = np.array([4, 2, 1]) / 7  # counts + 1
  expected = -np.mean(np.log2(q[[0, 1, 2, 2]]))
  assert prior.unigram_bits_per_code(train_codes, test_codes, 3) == pytest.approx(expected)


def test_prior_command_line_names_a_bad_config_value_in_one_line():
  result = cli('--config.pixelcnn.kernel_size=4')
  assert result.returncode == 2 and result.stderr.strip().count('\n') == 0, result.stderr
  assert 'config.pixelcnn.kernel_size=4 is not allowed: use an odd integer >= 3' in result.stderr


def test_prior_refuses_a_gaussian_run(tmp_path):
  (tmp_path / 'config.json').write_text(small_config('gaussian', 'none').to_json())
  (tmp_path / 'metrics.json').write_text('{}')
  (tmp_path / 'checkpoints' / 'best' / '1').mkdir(parents=True)  # finished, as its files say
  result = cli(f'--workdir={tmp_path}')
  assert result.returncode == 2 and result.stderr.strip().count('\n') == 0, result.stderr
  assert 'holds a run of model=gaussian: the prior is learned over the codes of a VQ-VAE' in (
      result.stderr)
