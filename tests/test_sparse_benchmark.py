"""The benchmark's scores and baselines on arrays with known answers."""
import jax
import numpy as np
import pytest
from scipy import stats

from mtvae_jax.completion import benchmark as bench
from mtvae_jax.completion import predictive
from mtvae_jax.errors import UserError


def gaussian_crps(mean, std, y):
  """Closed-form CRPS of N(mean, std^2) at y."""
  z = (y - mean) / std
  return std * (z * (2 * stats.norm.cdf(z) - 1) + 2 * stats.norm.pdf(z) - 1 / np.sqrt(np.pi))


def test_crps_of_gaussian_samples_matches_the_closed_form():
  rng = np.random.default_rng(0)
  mean, std = np.array([0.2, 0.5, 0.5, -1.0]), np.array([0.1, 0.3, 0.3, 2.0])
  truth = np.array([0.2, 0.9, 0.0, 3.0])
  samples = mean + std * rng.standard_normal((20000, 4))
  measured = bench.crps(samples.T[:, :, None], truth[:, None])[:, 0]
  np.testing.assert_allclose(measured, gaussian_crps(mean, std, truth), rtol=0.02)


def test_crps_of_one_repeated_sample_is_the_absolute_error():
  samples = np.full((3, 5), 0.4)
  np.testing.assert_allclose(bench.crps(samples, np.array([0.4, 0.1, 1.0])), [0.0, 0.3, 0.6],
                             atol=1e-6)   # float32


def test_coverage_of_gaussian_samples_matches_the_interval():
  rng = np.random.default_rng(1)
  samples = rng.standard_normal((4000, 400))
  inside = bench.inside_interval(samples, rng.standard_normal(4000))
  assert abs(inside.mean() - 0.9) < 4 * np.sqrt(0.09 / 4000) + 0.01
  z95 = stats.norm.ppf(0.95)
  edges = bench.inside_interval(samples[:3], np.array([0.0, z95 + 0.2, -z95 - 0.2]))
  np.testing.assert_array_equal(edges, [1.0, 0.0, 0.0])


def test_scores_count_hidden_pixels_only():
  rng = np.random.default_rng(2)
  truth = rng.uniform(size=(2, 16, 16, 1))
  mask = np.zeros((2, 16, 16, 1))
  mask[:, ::2] = 1.0
  mean = truth + 0.5 * mask  # wrong at the observed pixels only
  out = bench.scores(truth, mask, mean, np.repeat(mean[:, None], 4, axis=1))
  assert out['mse'] == 0.0 and out['crps'] == pytest.approx(0.0, abs=1e-12)
  assert out['ssim'] == pytest.approx(1.0, abs=1e-5) and out['coverage90'] == 1.0
  assert out['psnr'] == pytest.approx(100.0)  # the MSE floor of 1e-10
  shifted = bench.scores(truth, mask, truth + 0.1 * (1 - mask))
  assert shifted['mse'] == pytest.approx(0.01) and shifted['psnr'] == pytest.approx(20.0)
  assert shifted['ssim'] < 1.0 and shifted['crps'] is None and shifted['coverage90'] is None


def test_paired_difference_is_the_mean_difference_with_its_t_interval():
  errors, reference = np.array([3.0, 5.0, 4.0, 8.0]), np.array([2.0, 3.0, 1.0, 4.0])
  difference, (low, high) = bench.paired_difference(errors, reference)
  diffs = errors - reference   # 1, 2, 3, 4
  half = stats.t.ppf(0.975, 3) * np.std(diffs, ddof=1) / 2.0
  np.testing.assert_allclose([difference, low, high], [2.5, 2.5 - half, 2.5 + half], rtol=1e-9)
  assert bench.paired_difference(errors, errors - 1.0) == (1.0, None)   # no spread: no interval
  assert bench.paired_difference(errors[:1], reference[:1]) == (1.0, None)


def test_interpolation_is_exact_for_a_plane_and_nearest_outside_the_hull():
  rows, cols = np.meshgrid(np.arange(6), np.arange(6), indexing='ij')
  plane = (0.1 + 0.05 * rows + 0.1 * cols)[None, ..., None]
  mask = np.zeros((1, 6, 6, 1))
  mask[0, [1, 1, 4, 4], [1, 4, 1, 4]] = 1.0
  mean, samples = bench.interpolation(plane * mask, mask)
  assert samples is None
  np.testing.assert_allclose(mean[0, 1:5, 1:5], plane[0, 1:5, 1:5], atol=1e-6)
  assert mean[0, 0, 0, 0] == pytest.approx(plane[0, 1, 1, 0])  # nearest observed: (1, 1)
  assert mean[0, 5, 5, 0] == pytest.approx(plane[0, 4, 4, 0])


def test_interpolation_of_collinear_pixels_falls_back_to_nearest():
  mask = np.zeros((1, 5, 5, 1))
  mask[0, 2, [0, 4]] = 1.0
  x = np.zeros((1, 5, 5, 1))
  x[0, 2, 4] = 1.0
  mean, _ = bench.interpolation(x, mask)
  np.testing.assert_array_equal(mean[0, :, :2, 0], 0.0)
  np.testing.assert_array_equal(mean[0, :, 3:, 0], 1.0)


def test_nearest_neighbours_average_the_training_images_closest_on_observed_pixels():
  train = np.stack([np.full((4, 4, 1), v, np.float32) for v in (0.0, 0.3, 0.5, 1.0)])
  train[1, 0, 0] = 0.9  # image 1 matches x on the observed pixel, though not elsewhere
  mask = np.zeros((1, 4, 4, 1), np.float32)
  mask[0, 0, 0] = 1.0
  x = np.where(mask > 0, 0.88, 0.0).astype(np.float32)
  mean, samples = bench.nearest_neighbours(train, x, mask, k=1)
  np.testing.assert_array_equal(mean, train[1:2])
  mean, samples = bench.nearest_neighbours(train, x, mask, k=2)
  np.testing.assert_allclose(mean[0], (train[1] + train[3]) / 2)  # 0.9 and 1.0 beat 0.5
  assert samples.shape == (1, 2, 4, 4, 1)


def test_mean_image_is_the_training_mean_with_training_images_as_samples():
  train = np.arange(5 * 4, dtype=np.float32).reshape(5, 2, 2, 1)
  x, mask = np.zeros((3, 2, 2, 1)), np.ones((3, 2, 2, 1))
  mean, samples = bench.mean_image(train, x, mask, 6, jax.random.key(0))
  np.testing.assert_allclose(mean, np.broadcast_to(train.mean(axis=0), x.shape))
  assert samples.shape == (3, 6, 2, 2, 1)
  assert all(any(np.array_equal(s, t) for t in train) for s in samples.reshape(-1, 2, 2, 1))


def test_exact_benchmark_masks_are_one_grid_and_uniform_ones_differ():
  exact = bench.benchmark_masks(jax.random.key(0), 'exact', 7, 3, (8, 8))
  uniform = bench.benchmark_masks(jax.random.key(0), 'uniform', 7, 3, (8, 8))
  assert (exact == exact[0]).all() and not (uniform == uniform[0]).all()
  np.testing.assert_array_equal(uniform.sum(axis=(1, 2, 3)), 7)


@pytest.mark.parametrize('fractions', [[], [0.0001], [1.0], [0.5, 2.0], [float('nan')],
                                       [float('inf')], [0.1, float('-inf')]])
def test_check_fractions_refuses_fractions_observing_no_or_every_pixel_or_not_finite(fractions):
  with pytest.raises(UserError, match='observed fractions'):
    bench.check_fractions(fractions, 64)


def test_smoothing_keeps_a_constant_and_the_blend_recovers_its_weights():
  rng = np.random.default_rng(4)
  mask = (rng.uniform(size=(8, 8, 1)) < 0.2).astype(np.float32)
  for width in predictive.SMOOTHING_WIDTHS:
    np.testing.assert_allclose(predictive.smooth(np.full((8, 8, 1), 0.3) * mask, mask, width), 0.3,
                               rtol=1e-5)
  predictors = rng.uniform(size=(16, len(predictive.PREDICTORS), 8, 8, 1)).astype(np.float32)
  weights = np.array([0.5, 0.3, 0.15, 0.05], np.float32)
  truth = np.tensordot(predictors, weights, axes=([1], [0]))
  hidden = (rng.uniform(size=truth.shape) < 0.7).astype(np.float32)
  np.testing.assert_allclose(predictive.fit_blend(predictors, truth, hidden), weights, atol=1e-3)


def test_the_spread_is_chosen_by_the_crps_of_the_samples():
  """Truth drawn like the neighbours around their mean: their residuals, unscaled and without
  noise, score best."""
  rng = np.random.default_rng(5)
  near = rng.normal(size=(64, 8, 4, 4, 1)).astype(np.float32) * 0.1
  truth = rng.normal(size=(64, 4, 4, 1)).astype(np.float32) * 0.1 + 0.5
  predictors = np.zeros((64, len(predictive.PREDICTORS), 4, 4, 1), np.float32)
  predictors[:, 0] = 0.5
  residuals = np.stack([np.zeros_like(near), near - near.mean(axis=1, keepdims=True)], axis=1)
  choice = predictive.calibrate(jax.random.key(0), predictors, residuals, truth,
                                np.ones_like(truth), 0.01)
  assert choice['spread'][0] == 0.0 and choice['spread'][1] in (1.0, 1.25)
  assert predictive.valid(choice)


def test_the_calibrated_samples_score_no_worse_than_the_neighbours_and_cover_their_interval():
  """8 neighbours drawn like the truth around each image's centre, a noisy posterior mean: the
  choice's CRPS is at most the neighbours' own, and its coverage90 is in range where the
  neighbours' residuals as they are would cover 0.71."""
  rng = np.random.default_rng(6)
  centre = rng.uniform(0.3, 0.7, size=(64, 1, 4, 4, 1))
  near = (centre + 0.1 * rng.normal(size=(64, 8, 4, 4, 1))).astype(np.float32)
  truth = (centre[:, 0] + 0.1 * rng.normal(size=(64, 4, 4, 1))).astype(np.float32)
  predictors = np.zeros((64, len(predictive.PREDICTORS), 4, 4, 1), np.float32)
  predictors[:, 0] = truth + 0.3 * rng.normal(size=truth.shape)
  predictors[:, 1] = near.mean(axis=1)
  residuals = np.stack([0.3 * rng.normal(size=near.shape), near - near.mean(axis=1)[:, None]],
                       axis=1).astype(np.float32)
  key = jax.random.key(0)
  choice = predictive.calibrate(key, predictors, residuals, truth, np.ones_like(truth), 0.05)
  assert predictive.valid(choice)
  samples, _, _ = jax.vmap(predictive.predict, in_axes=(0, 0, 0, None, None, None))(
      jax.random.split(key, len(truth)), predictors, residuals, np.asarray(choice['blend']),
      np.asarray(choice['spread'], np.float32), 0.05)
  assert bench.crps(samples, truth).mean() <= bench.crps(near, truth).mean()
  assert bench.inside_interval(near, truth).mean() < 0.75
  assert 0.80 <= bench.inside_interval(samples, truth).mean() <= 0.97
