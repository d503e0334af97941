import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtvae_jax import config as config_lib
from mtvae_jax import masks
from mtvae_jax.errors import UserError


def draw(sampler, num, k, shape, seed=0):
  keys = jax.random.split(jax.random.key(seed), num)
  return np.asarray(jax.jit(jax.vmap(lambda key: sampler(key, k, shape)))(keys))


@pytest.mark.parametrize('k', [0, 1, 7, 64])
def test_uniform_mask_has_exactly_k_distinct_pixels(k):
  mask = draw(masks.uniform_mask, 200, k, (8, 8))
  chex.assert_shape(mask, (200, 8, 8, 1))
  np.testing.assert_array_equal(mask.sum(axis=(1, 2, 3)), k)
  assert set(np.unique(mask)) <= {0.0, 1.0}


def test_uniform_mask_covers_pixels_evenly():
  counts = draw(masks.uniform_mask, 4000, 8, (8, 8)).mean(axis=0).ravel()
  np.testing.assert_allclose(counts, 8 / 64, atol=0.025)


def test_uniform_mask_differs_between_draws():
  mask = draw(masks.uniform_mask, 2, 10, (8, 8))
  assert not np.array_equal(mask[0], mask[1])


@pytest.mark.parametrize('shape,k,stride,offset', [((8, 8), 16, 2, 0), ((8, 8), 4, 4, 0),
                                                  ((28, 28), 49, 4, 2), ((32, 32), 64, 4, 0)])
def test_exact_mask_is_the_fixed_regular_grid(shape, k, stride, offset):
  mask = draw(masks.exact_mask, 3, k, shape)
  grid = np.zeros((*shape, 1), np.float32)
  grid[offset::stride, offset::stride] = 1.0
  for m in mask:
    np.testing.assert_array_equal(m, grid)


@pytest.mark.parametrize('k', [0, 5, 30, 784])
def test_exact_mask_has_k_pixels_for_any_count(k):
  assert draw(masks.exact_mask, 1, k, (28, 28)).sum() == k


def test_gaussian_mask_draws_centre_more_often_than_border():
  mask = draw(masks.gaussian_mask, 3000, 20, (16, 16))
  freq = mask.mean(axis=0)[..., 0]
  assert freq[6:10, 6:10].mean() > 3 * freq[:2, :].mean()
  counts = mask.sum(axis=(1, 2, 3))
  assert counts.max() <= 20 and counts.min() >= 1
  assert counts.mean() < 20  # draws with replacement repeat pixels


def test_gaussian_mask_pixel_frequencies_match_the_discretised_gaussian():
  shape, std = (6, 5), 0.3
  freq = draw(lambda key, k, shape: masks.gaussian_mask(key, k, shape, std), 20000, 1, shape)
  rows = (np.arange(6) - 2.5) / (std * 6)
  cols = (np.arange(5) - 2.0) / (std * 5)
  expected = np.exp(-0.5 * (rows[:, None] ** 2 + cols[None] ** 2))
  expected /= expected.sum()
  np.testing.assert_allclose(freq.mean(axis=0)[..., 0], expected,
                             atol=4 * np.sqrt(expected.max() / 20000))


def test_gaussian_mask_with_zero_count_is_empty():
  assert draw(masks.gaussian_mask, 5, 0, (8, 8)).sum() == 0


@pytest.mark.parametrize('num_pixels,exponent', [(64, 20.0), (784, 40.0), (784, 60.0)])
def test_power_law_counts_match_closed_form(num_pixels, exponent):
  keys = jax.random.split(jax.random.key(1), 40000)
  counts = np.asarray(jax.vmap(lambda k: masks.power_law_count(k, num_pixels, exponent))(keys))
  assert counts.min() >= 0 and counts.max() <= num_pixels
  mean = masks.power_law_mean_count(num_pixels, exponent)
  np.testing.assert_allclose(counts.mean(), mean, rtol=0.03)
  empty = masks.power_law_empty_fraction(num_pixels, exponent)
  assert abs((counts == 0).mean() - empty) < 4 * np.sqrt(empty * (1 - empty) / len(counts)) + 1e-3


def test_power_law_masks_include_empty_ones_under_jit():
  sampler = lambda key, shape: masks.sample_mask(
      key, shape, sampling='uniform', count='power_law', num_pixels=0,
      power_law_exponent=60.0, gaussian_std=0.25)
  images = jnp.ones((2000, 8, 8, 1))
  counts = np.asarray(jax.jit(lambda key: masks.batch_masks(key, images, sampler))(
      jax.random.key(3))).sum(axis=(1, 2, 3))
  empty = masks.power_law_empty_fraction(64, 60.0)
  assert 0.5 * empty < (counts == 0).mean() < 1.5 * empty


def test_conditioning_stacks_mask_and_masked_image():
  images = jax.random.uniform(jax.random.key(0), (2, 4, 4, 3))
  mask = jnp.zeros((2, 4, 4, 1)).at[:, 1, 2].set(1.0)
  m = masks.conditioning(images, mask)
  chex.assert_shape(m, (2, 4, 4, 4))
  np.testing.assert_array_equal(m[..., :1], mask)
  np.testing.assert_allclose(m[:, 1, 2, 1:], images[:, 1, 2])
  assert float(jnp.abs(m[..., 1:]).sum()) == pytest.approx(float(jnp.abs(images[:, 1, 2]).sum()))


def mixture_masks(num, k, shape, seed=0, **weights):
  """`num` masks of sampling='mixture' with a fixed count k and sampling weights `weights`."""
  sampling_weights = dict(dict.fromkeys(masks.SAMPLINGS, 0.0), **weights)
  sampler = lambda key, k, shape: masks.sample_mask(
      key, shape, sampling=masks.MIXTURE, count='fixed', num_pixels=k, power_law_exponent=40.0,
      gaussian_std=0.25, sampling_weights=sampling_weights)
  return draw(sampler, num, k, shape, seed)


def test_mixture_sampling_draws_each_sampler_in_proportion_to_its_weight():
  mask = mixture_masks(2000, 16, (8, 8), exact=1.0, uniform=3.0)
  grid = np.asarray(masks.exact_mask(None, 16, (8, 8)))
  is_grid = np.all(mask == grid, axis=(1, 2, 3))
  assert abs(is_grid.mean() - 0.25) < 4 * np.sqrt(0.25 * 0.75 / 2000)
  np.testing.assert_array_equal(mask.sum(axis=(1, 2, 3)), 16)  # no gaussian draws (weight 0)


def test_mixture_sampling_with_one_weight_is_that_sampler():
  mask = mixture_masks(50, 30, (8, 8), gaussian=1.0)
  assert (mask.sum(axis=(1, 2, 3)) < 30).mean() > 0.9  # draws with replacement repeat pixels
  assert mask[:, 3:5, 3:5].mean() > 3 * mask[:, :2].mean()


@pytest.mark.parametrize('max_fraction', [0.5, 1.0])
def test_log_uniform_counts_match_closed_form(max_fraction):
  keys = jax.random.split(jax.random.key(2), 40000)
  counts = np.asarray(jax.vmap(lambda k: masks.log_uniform_count(k, 784, max_fraction))(keys))
  top = int(max_fraction * 784)
  assert counts.min() == 0 and counts.max() == top
  for j in (0, 7, 39, 195, top - 1):  # P(k <= j) = log(j + 2) / log(top + 2)
    np.testing.assert_allclose((counts <= j).mean(), np.log(j + 2) / np.log(top + 2), atol=0.01)


def test_mixture_count_draws_each_count_in_proportion_to_its_weight():
  sampler = lambda key, shape: masks.sample_mask(
      key, shape, sampling='uniform', count=masks.MIXTURE, num_pixels=20, power_law_exponent=1e6,
      gaussian_std=0.25, max_fraction=0.5,
      count_weights={'fixed': 1.0, 'power_law': 1.0, 'log_uniform': 0.0})
  images = jnp.ones((4000, 16, 16, 1))
  counts = np.asarray(jax.jit(lambda key: masks.batch_masks(key, images, sampler))(
      jax.random.key(4))).sum(axis=(1, 2, 3))
  assert set(np.unique(counts)) == {0, 20}  # a huge exponent: the power law's count is 0
  assert abs((counts == 20).mean() - 0.5) < 4 * np.sqrt(0.25 / 4000)


@pytest.mark.parametrize('section,name,value', [
    ('mixture.sampling_weights', 'exact', -1.0), ('mixture.count_weights', 'fixed', -0.5),
    ('', 'max_fraction', 0.0), ('', 'sampling', 'mixed'), ('', 'count', 'mixed')])
def test_config_refuses_bad_mixture_settings(section, name, value):
  config = config_lib.base_config('gaussian', 'single')
  config.mask.update(sampling='mixture', count='mixture')
  parent = config.mask
  for part in filter(None, section.split('.')):
    parent = parent[part]
  parent[name] = value
  with pytest.raises(UserError, match=f'config.mask.{section or name}'):
    config_lib.validate(config)


def test_config_refuses_all_zero_mixture_weights():
  config = config_lib.base_config('gaussian', 'single')
  config.mask.mixture.sampling_weights = dict.fromkeys(masks.SAMPLINGS, 0.0)
  with pytest.raises(UserError, match='mask.mixture.sampling_weights'):
    config_lib.validate(config)
