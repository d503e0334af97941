"""End to end on digits: a trained VQ run, its prior from the command line, and generation.

One small VQ-VAE (method single) is trained once for the module; the prior
(stage 2) and the PNG grids are made by the command lines a user runs.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import small_config, STEPS_PER_EPOCH
from mtvae_jax import generate
from mtvae_jax import prior
from mtvae_jax import train
from mtvae_jax.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_prior_config():
  config = prior.default_config()
  config.pixelcnn.update(features=16, num_layers=2)
  config.train.update(num_epochs=6, batch_size=64, learning_rate=3e-3)
  return config


def config_flags(config):
  return [f'--config.{section}.{key}={value}'
          for section in ('pixelcnn', 'train') for key, value in config[section].items()]


def cli(module, *args):
  return subprocess.run([sys.executable, '-m', f'experiments.{module}', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, PYTHONPATH=str(ROOT)))


@pytest.fixture(scope='module')
def vq_run(tmp_path_factory):
  """(workdir, loaded run) of a small VQ-VAE run (method single) with its prior."""
  workdir = tmp_path_factory.mktemp('vq_single')
  train.train_and_evaluate(small_config('vq', 'single', num_epochs=2), workdir)
  result = cli('prior', f'--workdir={workdir}', *config_flags(tiny_prior_config()))
  assert result.returncode == 0, result.stderr
  assert 'test bits per code' in result.stdout
  return workdir, train.load_run(workdir)


def test_trained_prior_beats_unigram_which_beats_uniform(vq_run):
  workdir, run = vq_run
  prior_dir = workdir / 'prior'
  metrics = json.loads((prior_dir / 'metrics.json').read_text())
  assert metrics['test_bits_per_code'] < metrics['unigram_bits_per_code']
  assert metrics['unigram_bits_per_code'] < metrics['uniform_bits_per_code'] == 4.0
  history = [json.loads(line) for line in (prior_dir / 'history.jsonl').read_text().splitlines()]
  assert metrics['best_epoch'] == 1 + int(np.argmin([h['val/bits_per_code'] for h in history]))
  assert (prior_dir / 'checkpoints' / 'best' / str(metrics['best_epoch'])).is_dir()

  assert prior.train_prior(tiny_prior_config(), workdir) == metrics  # a finished prior is kept

  # the restored best checkpoint scores the validation codes as during training
  model, state = prior.load_prior(workdir, run)
  codes = prior.encode_codes(run, run.splits.validation, 64)
  bits = prior.bits_per_code(model.apply({'params': state.params}, codes), codes)
  assert float(jnp.mean(bits)) == pytest.approx(metrics['best_val_bits_per_code'], rel=1e-4)


def test_interrupted_prior_training_resumes_to_the_same_metrics(vq_run, tmp_path, sigterm_after,
                                                               monkeypatch, capsys):
  workdir, _ = vq_run
  copy = tmp_path / 'run'  # the VQ run without its prior
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns('prior', 'samples'))
  sigterm_after(2 * STEPS_PER_EPOCH + 4)
  with pytest.raises(UserError, match='stopped by SIGTERM at epoch 3, step 5'):
    prior.train_prior(tiny_prior_config(), copy)
  monkeypatch.undo()
  capsys.readouterr()
  assert prior.train_prior(tiny_prior_config(), copy) == json.loads(
      (workdir / 'prior' / 'metrics.json').read_text())
  assert 'resuming at epoch 3, step 5' in capsys.readouterr().out
  history = [json.loads(line) for line in (copy / 'prior' / 'history.jsonl').read_text().splitlines()]
  assert [h['epoch'] for h in history] == list(range(1, 7))


def test_codes_index_the_codebook_and_look_up_the_quantized_latents(vq_run):
  _, run = vq_run
  images = run.splits.test[:5]
  codes = prior.apply_model(run, 'codes', images)
  assert codes.shape == (5, *prior.code_grid(run)) and codes.dtype == jnp.int32
  assert 0 <= int(codes.min()) and int(codes.max()) < run.config.vq.num_embeddings
  z_q, _ = run.model.apply({'params': run.state.params, 'batch_stats': run.state.batch_stats},
                           images, method='encode', train=False)
  np.testing.assert_allclose(prior.apply_model(run, 'lookup', codes), z_q, atol=1e-6)


def test_vq_generation_needs_a_trained_prior(vq_run, tmp_path):
  _, run = vq_run
  with pytest.raises(UserError, match='holds no trained prior .* run python -m experiments.prior'):
    generate.latent_sampler(run, tmp_path)


def test_completions_from_prior_samples_are_images_with_their_mean_and_std(vq_run):
  workdir, run = vq_run
  draw = generate.latent_sampler(run, workdir)
  out = generate.generate_arrays(run, draw, 5, pixels=10, sampling='uniform', temperature=0.8,
                                 image=2)
  assert set(out) == {'samples', 'image', 'mask', 'completions', 'mean', 'std'}
  for name in ('samples', 'completions'):
    assert out[name].shape == (5, 8, 8, 1)
    assert out[name].min() >= 0.0 and out[name].max() <= 1.0
    assert out[name].std(axis=0).max() > 0  # different prior samples, different images
  assert out['mask'].shape == (8, 8, 1) and out['mask'].sum() == 10
  np.testing.assert_array_equal(out['image'], run.splits.test[2])
  np.testing.assert_allclose(out['mean'], out['completions'].mean(axis=0), atol=1e-6)
  np.testing.assert_allclose(out['std'], out['completions'].std(axis=0), atol=1e-6)


def test_gaussian_samples_come_from_decoder_one_and_refuse_given_pixels():
  run = train.setup(small_config('gaussian', 'none'))
  draw = generate.gaussian_latents(run)
  out = generate.generate_arrays(run, draw, 4, seed=1)
  assert set(out) == {'samples'}
  assert out['samples'].shape == (4, 8, 8, 1)
  assert out['samples'].min() >= 0.0 and out['samples'].max() <= 1.0
  z = draw(jax.random.key(0), 4000, 0.5)
  assert z.shape == (4000, 4) and float(jnp.std(z)) == pytest.approx(0.5, rel=0.05)
  with pytest.raises(UserError, match="pixels=5 is not allowed: this run's method is none"):
    generate.generate_arrays(run, draw, 4, pixels=5)


@pytest.mark.parametrize('kwargs,message', [
    (dict(num=0), 'num=0 is not allowed: use an integer >= 1'),
    (dict(pixels=65), 'pixels=65 is not allowed: use a count from 0 to 64'),
    (dict(sampling='poisson'), "sampling='poisson' is not allowed: use one of exact, uniform"),
    (dict(temperature=0.0), 'temperature=0.0 is not allowed: use a finite number > 0'),
    (dict(image=180), 'image=180 is not allowed: use a test image index from 0 to 179'),
])
def test_bad_arguments_raise_one_line_user_errors(vq_run, kwargs, message):
  _, run = vq_run
  with pytest.raises(UserError, match=message) as error:
    generate.generate_arrays(run, None, **kwargs)
  assert '\n' not in str(error.value)


def test_image_grid_enlarges_and_lays_out_images_row_by_row():
  images = np.random.default_rng(0).uniform(size=(3, 8, 8, 1))
  grid = generate.image_grid(images, columns=2)
  scale = generate.MIN_SIDE // 8
  cell = 8 * scale + 1  # enlarged image and one line
  assert grid.shape == (2 * cell + 1, 2 * cell + 1, 1) and grid.dtype == np.uint8
  top_right = grid[1:cell, 1 + cell:2 * cell, 0]
  expected = np.kron(images[1, ..., 0], np.ones((scale, scale)))
  np.testing.assert_array_equal(top_right, np.round(255 * expected).astype(np.uint8))
  assert (grid[1 + cell:2 * cell, 1 + cell:2 * cell] == 128).all()  # the empty fourth cell


def test_command_line_writes_png_grids_of_samples_and_completions(vq_run):
  workdir, _ = vq_run
  result = cli('generate', f'--workdir={workdir}', '--num=6', '--pixels=5',
               '--sampling=gaussian', '--image=3')
  assert result.returncode == 0, result.stderr
  folder = workdir / 'samples'
  arrays = np.load(folder / 'samples.npz')
  assert arrays['samples'].shape == arrays['completions'].shape == (6, 8, 8, 1)
  assert 1 <= arrays['mask'].sum() <= 5  # gaussian draws may repeat a pixel
  panel = generate.given_pixels_panel(*(arrays[key] for key in ('image', 'mask', 'mean', 'std')))
  for name, images, columns in (('samples', arrays['samples'], 3),
                                ('completions', arrays['completions'], 3), ('given_pixels', panel, 4)):
    grid = generate.image_grid(images, columns)
    png = np.asarray(Image.open(folder / f'{name}.png'))[..., :3]
    np.testing.assert_array_equal(png[-len(grid):], np.broadcast_to(grid, (*grid.shape[:2], 3)))
    assert png[:-len(grid)].min() < 128  # a title above the grid


def test_command_line_refuses_a_config_flag(vq_run):
  workdir, _ = vq_run
  result = cli('generate', f'--workdir={workdir}', '--config=configs/prior.py')
  assert result.returncode == 2 and result.stderr.strip().count('\n') == 0, result.stderr
  assert '--config is not a flag of experiments.generate' in result.stderr
