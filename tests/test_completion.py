"""Completion from a few observed pixels, on small runs trained once for the module.

A Gaussian VAE (method single, mask sampling and count 'mixture') and a VQ-VAE
(method none) are trained on digits; the VQ run gets a small PixelCNN prior. The command lines
experiments.complete and experiments.sparse_benchmark run as a user runs them.
"""
import json
import re
import shutil

import jax
import numpy as np
import pytest
import scipy.stats
from PIL import Image

from conftest import quick_calibration, run_quickly_calibrated, small_config
import mtvae_jax
from mtvae_jax import completion
from mtvae_jax import masks
from mtvae_jax import prior
from mtvae_jax.completion import benchmark as sparse_benchmark
from mtvae_jax.completion import io as completion_io
from mtvae_jax.completion import predictive
from mtvae_jax.errors import UserError

SETTINGS = completion.Settings(num_proposals=64, num_steps=8, neighbours=64)
NUM_SAMPLES = 8


@pytest.fixture(scope='module', autouse=True)
def calibrated_quickly():
  """Every completer of the module calibrates on conftest.QUICK_CALIBRATION's few images."""
  with quick_calibration():
    yield


def train_run(workdir, model, method, num_epochs):
  config = small_config(model, method, num_epochs=num_epochs)
  config.mask.update(sampling='mixture', count='mixture')
  mtvae_jax.train_and_evaluate(config, workdir)
  return workdir


@pytest.fixture(scope='module')
def gaussian_run(tmp_path_factory):
  workdir = train_run(tmp_path_factory.mktemp('gaussian'), 'gaussian', 'single', num_epochs=8)
  return workdir, completion.completer(workdir)


@pytest.fixture(scope='module')
def vq_run(tmp_path_factory):
  # method none: decoder 1 alone, the observed pixels reach it only through the codes (the small
  # VQ-VAEs of method single learn to ignore their codes on digits)
  workdir = train_run(tmp_path_factory.mktemp('vq'), 'vq', 'none', num_epochs=10)
  config = prior.default_config()
  config.pixelcnn.update(features=16, num_layers=2)
  config.train.update(num_epochs=2, batch_size=64)
  prior.train_prior(config, workdir)
  return workdir, completion.completer(workdir)


def observed_images(helper, num, fraction, seed=0):
  """The first `num` test images, uniform masks observing `fraction` of their pixels, and x."""
  truth = np.asarray(helper.run.splits.test[:num])
  height, width = truth.shape[1:3]
  mask = np.asarray(jax.vmap(lambda key: masks.uniform_mask(key, round(fraction * height * width),
                                                             (height, width)))(
      jax.random.split(jax.random.key(seed), num)))
  return truth, mask, np.where(mask > 0, truth, 0.0).astype(np.float32)


def hidden_mse(truth, mask, mean):
  hidden = np.broadcast_to(mask == 0, truth.shape)
  return float(np.mean(np.square(mean - truth)[hidden]))


def _completions(run):
  """Truth, mask and every method's completion of 16 test images with half their pixels seen."""
  _, helper = run
  truth, mask, x = observed_images(helper, 16, 0.5)
  return helper, truth, mask, {
      method: completion.complete_arrays(helper, x, mask, NUM_SAMPLES, method, settings=SETTINGS)
      for method in completion.METHODS}


@pytest.fixture(scope='module')
def gaussian_completions(gaussian_run):
  return _completions(gaussian_run)


@pytest.fixture(scope='module')
def vq_completions(vq_run):
  return _completions(vq_run)


@pytest.mark.parametrize('family', ['gaussian', 'vq'])
def test_posterior_completions_agree_with_the_observed_pixels(family, request):
  helper, truth, mask, outs = request.getfixturevalue(f'{family}_completions')
  observed = np.broadcast_to(mask > 0, truth.shape)
  rms = {}
  for method, out in outs.items():
    rms[method] = np.sqrt(np.mean(np.square(out['mean'] - truth)[observed]))
    # the samples scatter around the observed values by about the noise scale
    spread = np.sqrt(np.mean(np.square(out['samples'] - truth[:, None])[:, :, observed[0]]))
    assert spread < 2.5 * helper.noise['observed']
  assert rms['posterior'] < 1.2 * helper.noise['observed']
  assert rms['posterior'] < 0.9 * rms['prior']


def test_posterior_mean_beats_the_prior_mean_on_hidden_pixels(gaussian_completions):
  _, truth, mask, outs = gaussian_completions
  errors = {method: hidden_mse(truth, mask, out['mean']) for method, out in outs.items()}
  assert errors['posterior'] < 0.9 * errors['prior']


def test_nearest_finds_the_closest_images_on_the_observed_pixels_only():
  images = np.zeros((5, 2, 2, 1), np.float32)
  images[:, 0, 0, 0] = [0.9, 0.1, 0.5, 0.2, 0.0]
  images[:, 1, 1, 0] = [0.0, 1.0, 1.0, 1.0, 1.0]  # hidden: must not count
  x = np.zeros((2, 2, 1), np.float32)
  x[0, 0, 0] = 0.15
  mask = np.zeros((2, 2, 1), np.float32)
  mask[0, 0, 0] = 1.0
  near = np.asarray(completion.nearest(x, mask, images, 2))
  np.testing.assert_allclose(near[:, 0, 0, 0], [0.1, 0.2])


def test_mala_leaves_the_aggregate_posterior_invariant():
  """Chains started from draws of a two-component mixture, moved by MALA with a flat likelihood,
  must keep the mixture's moments; its log density must be the mixture's."""
  means = np.array([[-1.0, 0.5], [2.0, 0.0]], np.float32)
  log_vars = np.log(np.array([[0.25, 1.0], [0.5, 0.04]], np.float32))
  own = jax.random.randint(jax.random.key(2), (20_000,), 0, len(means))
  z = completion.component_draws(jax.random.key(0), means, log_vars, own)
  moved = completion.mala(jax.random.key(1), z, lambda z: completion.log_aggregate(means, log_vars, z), 20)
  expected_mean = means.mean(axis=0)
  expected_var = np.exp(log_vars).mean(axis=0) + means.var(axis=0)
  for draws in (np.asarray(z), np.asarray(moved)):
    np.testing.assert_allclose(draws.mean(axis=0), expected_mean, atol=0.04)
    np.testing.assert_allclose(draws.var(axis=0), expected_var, rtol=0.05)
  assert np.mean(np.any(np.asarray(moved) != np.asarray(z), axis=1)) > 0.3   # the chains moved
  point = np.array([[0.3, -0.2]], np.float32)
  densities = [scipy.stats.multivariate_normal(mu, np.diag(np.exp(lv))).pdf(point[0])
               for mu, lv in zip(means, log_vars)]
  np.testing.assert_allclose(completion.log_aggregate(means, log_vars, point)[0],
                             np.log(np.mean(densities)) + np.log(2 * np.pi), rtol=1e-5)


def test_noise_scales_are_the_decoders_validation_residuals(gaussian_run):
  workdir, helper = gaussian_run
  noise = helper.noise
  assert 0 < noise['observed'] < noise['hidden'] < 0.5
  assert len(noise['weighting']) == len(completion.CALIBRATION_FRACTIONS)
  for source, ess, ridge in noise['weighting']:
    assert source in completion.SOURCES and ess in completion.ESS_TARGETS
    assert ridge in completion.RIDGES
  assert len(noise['predictive']) == len(completion.CALIBRATION_FRACTIONS)
  assert all(map(predictive.valid, noise['predictive']))
  assert json.loads((workdir / completion.CACHE_DIR / 'noise.json').read_text()) == dict(
      noise, sha256=completion.digest(noise))   # with its own sum


def test_effective_size_counts_equal_weights_and_one_weight():
  np.testing.assert_allclose(completion.effective_size(np.zeros(10)), 10.0, rtol=1e-6)
  np.testing.assert_allclose(completion.effective_size(np.array([0.0, -np.inf, -np.inf])), 1.0)
  log_w = np.log(np.array([0.5, 0.25, 0.25]))
  np.testing.assert_allclose(completion.effective_size(log_w), 1.0 / (0.25 + 2 * 0.0625), rtol=1e-6)


def test_temper_reaches_the_target_effective_size_and_ignores_infinite_errors():
  errors = np.random.default_rng(0).gamma(2.0, 3.0, 200).astype(np.float32)
  errors[:50] = np.inf   # proposals without a score get no weight
  temperatures = []
  for ess in (1.5, 4.0, 16.0, 64.0):
    log_weights, temperature = completion.temper(np.zeros(200, np.float32), errors, ess)
    np.testing.assert_allclose(completion.effective_size(log_weights), ess, rtol=1e-3)
    assert np.all(np.isneginf(np.asarray(log_weights)[:50]))
    temperatures.append(float(temperature))
  assert temperatures == sorted(temperatures)
  # more than the proposals can give: the flattest weights, all 150 scored proposals
  log_weights, _ = completion.temper(np.zeros(200, np.float32), errors, 500.0)
  np.testing.assert_allclose(completion.effective_size(log_weights), 150.0, rtol=1e-3)


def test_each_source_weighs_the_proposals_by_its_own_error():
  rng = np.random.default_rng(1)
  own = np.concatenate([np.full(6, -1), np.arange(10)])   # 6 prior draws, then 10 neighbours
  log_ratio = rng.normal(size=16).astype(np.float32) * 3.0
  errors = {'decoder': rng.gamma(2.0, 3.0, 16).astype(np.float32),
            'neighbours': np.where(own >= 0, rng.gamma(2.0, 3.0, 16), np.inf).astype(np.float32)}
  proposals = completion.Proposals(None, log_ratio, None, own, None, errors)
  weights = {name: np.asarray(completion.posterior_weights(proposals, index, 4.0)[0])
             for index, name in enumerate(completion.SOURCES)}
  # the decoder's weights count the prior draws; the other two sources leave them out
  assert np.all(np.isfinite(weights['decoder']))
  for name in ('neighbours', 'decoder_on_neighbours'):
    assert np.all(np.isneginf(weights[name][:6])) and np.all(np.isfinite(weights[name][6:]))
    np.testing.assert_allclose(completion.effective_size(weights[name]), 4.0, rtol=1e-3)
  # with equal prior weights, the two decoder sources rank the neighbours by the same errors
  order = lambda w: np.argsort(-w[6:])
  np.testing.assert_array_equal(order(weights['decoder_on_neighbours']),
                                np.argsort(errors['decoder'][6:]))
  np.testing.assert_array_equal(order(weights['neighbours']), np.argsort(errors['neighbours'][6:]))


def test_regression_adjustment_recovers_completions_linear_in_the_observed_pixels():
  # 40 draws of a 4x4 image observed at 3 pixels, each completion linear in the draw's pixels there
  rng = np.random.default_rng(2)
  mask = np.zeros((4, 4, 1), np.float32)
  mask[[0, 1, 3], [0, 2, 1]] = 1
  observed = rng.uniform(size=(40, 4, 4, 1)).astype(np.float32) * mask
  slope = rng.normal(size=(16, 16)).astype(np.float32)
  completions = 0.5 + (observed.reshape(40, 16) @ slope).reshape(40, 4, 4, 1)
  weights = rng.dirichlet(np.ones(40)).astype(np.float32)
  misfit = (rng.uniform(size=(2, 4, 4, 1)).astype(np.float32) - observed[:2]) * mask
  adjust = completion.regression_adjustment(weights, observed, completions, 1e-6)
  expected = (misfit.reshape(2, 16) @ slope).reshape(2, 4, 4, 1)
  np.testing.assert_allclose(adjust(misfit), expected, atol=2e-3)
  # a large ridge shrinks the correction towards none; no misfit, no correction
  strong = completion.regression_adjustment(weights, observed, completions, 1e3)(misfit)
  assert np.abs(strong).max() < 0.01 * np.abs(expected).max()
  np.testing.assert_allclose(adjust(np.zeros_like(misfit)), 0.0, atol=1e-6)


def test_an_image_takes_the_weighting_of_the_calibrated_fraction_nearest_its_own():
  fractions = completion.CALIBRATION_FRACTIONS
  index_at = lambda fraction: int(completion.weighting_index(
      (np.arange(10_000) < fraction * 10_000).astype(np.float32).reshape(100, 100, 1)))
  for index, fraction in enumerate(fractions):
    assert index_at(fraction) == index
  low, high = fractions[1], fractions[2]
  assert index_at(np.sqrt(low * high) * 0.95) == 1   # nearer the lower one on log scales
  assert index_at(np.sqrt(low * high) * 1.05) == 2
  assert index_at(fractions[0] / 10) == 0 and index_at(1.0) == len(fractions) - 1


def test_complete_takes_nans_at_hidden_pixels_a_shared_mask_and_is_reproducible(gaussian_run):
  workdir, helper = gaussian_run
  truth = np.asarray(helper.run.splits.test[:3])
  mask = np.zeros(truth.shape[1:3])
  mask[::2, ::3] = 1
  values = np.where(mask[None, ..., None] > 0, truth, np.nan)
  out = mtvae_jax.complete(workdir, values, mask, num_samples=4, method='prior', seed=3)
  assert out['samples'].shape == (3, 4, *truth.shape[1:])
  assert out['mean'].shape == out['std'].shape == truth.shape
  assert all(np.isfinite(a).all() for a in out.values())
  again = completion.complete_arrays(helper, *completion.check_inputs(values, mask, truth.shape[1:]),
                                     num_samples=4, method='prior', seed=3)
  for name, value in out.items():
    np.testing.assert_array_equal(again[name], value)


@pytest.mark.parametrize('values_shape,mask_shape,change,message', [
    ((2, 8, 7, 1), (8, 7), None, r'values of shape \(2, 8, 7, 1\) do not fit the run: use \(N, 8, 8, 1\)'),
    ((2, 8, 8, 1), (7, 8), None, r'mask of shape \(7, 8\) does not fit'),
    ((2, 8, 8, 1), (3, 8, 8), None, r'mask of shape \(3, 8, 8\) does not fit'),
    ((2, 8, 8, 1), (8, 8), 'empty', 'mask of image 1 observes no pixel'),
    ((2, 8, 8, 1), (8, 8), 'range', "observed value 1.5 is outside the run's range"),
    ((2, 8, 8, 1), (8, 8), 'nan', "observed value nan is outside the run's range"),
    ((2, 8, 8, 1), (8, 8), 'binary', 'mask holds values other than 0 and 1'),
])
def test_bad_inputs_are_refused_naming_what_fits(values_shape, mask_shape, change, message):
  values, mask = np.full(values_shape, 0.5), np.ones(mask_shape)
  if change == 'empty':
    mask = np.ones((2, 8, 8))
    mask[1] = 0
  elif change == 'range':
    values[1, 2, 3] = 1.5
  elif change == 'nan':
    values[0, 0, 0] = np.nan
  elif change == 'binary':
    mask[0, 0] = 0.5
  with pytest.raises(UserError, match=message):
    completion.check_inputs(values, mask, (8, 8, 1))


def test_complete_cli_writes_the_arrays_and_the_panel(gaussian_run, tmp_path):
  workdir, helper = gaussian_run
  truth = np.asarray(helper.run.splits.test[:2])
  mask = np.zeros((2, 8, 8))
  mask[:, 1::3, 1::2] = 1
  np.savez(tmp_path / 'in.npz', values=np.where(mask[..., None] > 0, truth, np.nan), mask=mask)
  result = run_quickly_calibrated('experiments.complete', f'--workdir={workdir}',
                                  f'--input={tmp_path}/in.npz', f'--output={tmp_path}/out.npz',
                                  '--num_samples=4', '--method=prior')
  assert result.returncode == 0, result.stderr
  with np.load(tmp_path / 'out.npz') as out:
    assert out['samples'].shape == (2, 4, 8, 8, 1)
    np.testing.assert_array_equal(out['mask'], mask)
  assert Image.open(tmp_path / 'out.png').size[0] > 0


def write_png(path, array):
  Image.fromarray(np.asarray(array, np.uint8)).save(path)


def bad_input(tmp_path, case):
  """(input file, mask file or None) of the bad input `case`."""
  source, mask_file = tmp_path / 'in.npz', None
  values, mask = np.full((1, 8, 8, 1), 0.5), np.ones((1, 8, 8))
  if case in ('mask_size', 'unreadable_image'):
    source, mask_file = tmp_path / 'in.png', tmp_path / 'mask.png'
    write_png(source, np.full((8, 8), 128))
    write_png(mask_file, np.full((8, 5), 255))
    if case == 'unreadable_image':
      source.write_bytes(b'not an image')
    return source, mask_file
  if case == 'unreadable':
    source.write_bytes(b'not a zip file')
    return source, None
  if case == 'shape':
    values = np.full((1, 8, 9, 1), 0.5)
  elif case == 'range':
    values[0, 3, 3] = 2.0
  elif case == 'empty':
    mask[:] = 0
  arrays = {'values': values} if case == 'arrays' else {'values': values, 'mask': mask}
  np.savez(source, **arrays)
  return source, None


@pytest.mark.parametrize('case,message', [
    ('shape', r'values of shape \(1, 8, 9, 1\) do not fit the run: use \(N, 8, 8, 1\)'),
    ('range', r"observed value 2.0 is outside the run's range: use values in \[0.0, 1.0\]"),
    ('empty', 'mask of image 0 observes no pixel'),
    ('mask_size', '--mask of 5x8 pixels does not fit the 8x8 image: use a mask of the same size'),
    ('unreadable', "--input '.*in.npz' is not an .npz \\(a zip archive of arrays\\)"),
    ('unreadable_image', "--input '.*in.png' cannot be read as an image"),
    ('arrays', r"lacks the array\(s\) mask: save values and mask"),
])
def test_complete_command_refuses_bad_inputs(gaussian_run, tmp_path, case, message):
  workdir, _ = gaussian_run
  source, mask_file = bad_input(tmp_path, case)
  with pytest.raises(UserError, match=message):
    completion_io.complete_files(workdir, str(source), mask_file and str(mask_file),
                                 tmp_path / 'out.npz', 4)


def test_completing_images_in_chunks_reports_the_progress_after_each(gaussian_run):
  _, helper = gaussian_run
  _, mask, x = observed_images(helper, 20, 0.5)
  lines = []
  out = completion.complete_arrays(helper, x, mask, 4, 'prior', progress=lines.append)
  assert out['samples'].shape[:2] == (20, 4)
  size = completion.chunk_size(20, 4, completion.Settings(), 'gaussian')
  assert size < 20 and len(lines) == -(-20 // size) - 1
  assert re.fullmatch(rf'completed {size}/20 images, about \d+ s left', lines[0])


def test_a_new_prior_makes_the_completion_cache_anew(vq_run, tmp_path):
  workdir, helper = vq_run
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)
  codes = (copy / completion.CACHE_DIR / 'prior_codes.json').read_text()
  assert completion.completer(copy).noise == helper.noise   # the same checkpoints: cached
  assert (copy / completion.CACHE_DIR / 'prior_codes.json').read_text() == codes
  shutil.rmtree(copy / prior.PRIOR_DIR)
  config = prior.default_config()
  config.pixelcnn.update(features=16, num_layers=2)
  config.train.update(num_epochs=1, batch_size=64)
  config.seed = 1
  prior.train_prior(config, copy)
  again = completion.completer(copy)
  cache = json.loads((copy / completion.CACHE_DIR / 'prior_codes.json').read_text())
  assert cache['made_from'] == again.noise['made_from'] != helper.noise['made_from']
  assert cache['codes'] != json.loads(codes)['codes']


def test_complete_cli_reports_a_bad_input_in_one_line(gaussian_run, tmp_path):
  workdir, _ = gaussian_run
  source, _ = bad_input(tmp_path, 'empty')
  result = run_quickly_calibrated('experiments.complete', f'--workdir={workdir}',
                                  f'--input={source}', f'--output={tmp_path}/out.npz')
  assert result.returncode == 2
  assert result.stderr.strip() == 'error: mask of image 0 observes no pixel: observe at least one'


@pytest.fixture(scope='module')
def benchmark_result(gaussian_run):
  _, helper = gaussian_run
  return sparse_benchmark.benchmark(helper, (0.1, 0.25, 0.5), num_images=32,
                                    num_samples=NUM_SAMPLES, neighbours=3, settings=SETTINGS,
                                    log=lambda line: None)


def test_sparse_benchmark_writes_the_documented_layout(gaussian_run, benchmark_result):
  workdir, _ = gaussian_run
  sparse_benchmark.write(workdir, benchmark_result)
  out = json.loads((workdir / sparse_benchmark.RESULT_FILE).read_text())
  assert set(out) == {'fractions', 'results', 'images_per_second', 'posterior_vs'}
  assert out['fractions'] == [0.1, 0.25, 0.5]
  assert set(out['results']) == set(out['images_per_second']) == set(sparse_benchmark.METHODS)
  for method, by_sampling in out['results'].items():
    assert set(by_sampling) == {'uniform', 'exact'}
    for values in by_sampling.values():
      assert set(values) == set(sparse_benchmark.SCORES)
      assert all(len(v) == 3 for v in values.values())
      assert (values['crps'][0] is None) == (method == 'interpolation')
    assert all(len(speeds) == 3 and min(speeds) > 0
               for speeds in out['images_per_second'][method].values())
  assert set(out['posterior_vs']) == set(sparse_benchmark.METHODS) - {'posterior'}
  for method, by_sampling in out['posterior_vs'].items():
    for sampling, values in by_sampling.items():
      for score, (differences, intervals) in sparse_benchmark.VERSUS.items():
        mine = out['results']['posterior'][sampling][score]
        theirs = out['results'][method][sampling][score]
        if theirs[0] is None:
          assert values[differences] == values[intervals] == [None] * 3
          continue
        for difference, (low, high), a, b in zip(values[differences], values[intervals], mine,
                                                 theirs):
          assert low < difference < high   # every image has as many hidden pixels: pooled means
          np.testing.assert_allclose(difference, a - b, rtol=1e-4, atol=1e-7)
  assert (workdir / sparse_benchmark.FIGURE_FILE).stat().st_size > 0
  table = sparse_benchmark.table(out)
  assert '| uniform | posterior |' in table and 'images per second' in table


def test_more_observed_pixels_never_make_the_posterior_worse(benchmark_result):
  """Its hidden-pixel MSE falls as the observed fraction grows, and stays at or below
  interpolation's and near the neighbours' where they have many pixels to go on."""
  results = benchmark_result['results']
  for sampling in ('uniform', 'exact'):
    mse = {method: results[method][sampling]['mse'] for method in results}
    assert mse['posterior'] == sorted(mse['posterior'], reverse=True)
    for mine, interpolated, near in zip(mse['posterior'], mse['interpolation'],
                                        mse['nearest_neighbours']):
      assert mine <= interpolated and mine <= 1.1 * near


def test_bad_inputs_are_refused_before_the_run_is_calibrated(gaussian_run, tmp_path):
  workdir, helper = gaussian_run
  fresh = tmp_path / 'run'
  shutil.copytree(workdir, fresh, ignore=shutil.ignore_patterns(completion.CACHE_DIR))
  values = np.full((2, *helper.run.splits.test.shape[1:]), 0.5)
  with pytest.raises(UserError, match='mask of image 1 observes no pixel'):
    mtvae_jax.complete(fresh, values, np.stack([np.ones((8, 8)), np.zeros((8, 8))]))
  with pytest.raises(UserError, match='num_samples=1 is not allowed'):
    mtvae_jax.complete(fresh, values, np.ones((8, 8)), num_samples=1)
  assert not (fresh / completion.CACHE_DIR).exists()


@pytest.mark.parametrize('flags,message', [
    (['--counts=0,8'], '--counts=0,8 is not allowed: give pixel counts from 1 to 63 (8x8 images)'),
    (['--counts=8', '--fractions=0.1'], 'give --fractions or --counts, not both'),
    (['--posterior_neighbours=-1'], '--posterior_neighbours=-1 is not allowed: use an integer >= 0'),
])
def test_sparse_benchmark_cli_refuses_bad_flags_in_one_line(gaussian_run, flags, message):
  workdir, _ = gaussian_run
  result = run_quickly_calibrated('experiments.sparse_benchmark', f'--workdir={workdir}', *flags)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [f'error: {message}']
