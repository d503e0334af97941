"""Diagnostics on constructed cases whose answers are known."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtvae_jax import diagnostics


def test_code_counts_count_each_code_of_the_weighted_images():
  codes = jnp.array([[[0, 0], [1, 3]], [[2, 2], [2, 2]]])  # (B=2, 2, 2)
  np.testing.assert_array_equal(diagnostics.code_counts(codes, 5), [2, 1, 4, 1, 0])
  np.testing.assert_array_equal(diagnostics.code_counts(codes, 5, jnp.array([1, 0])),
                                [2, 1, 0, 1, 0])


@pytest.mark.parametrize('counts, expected', [
    ([5, 5, 5, 5], 4.0),             # all K codes alike: K
    ([0, 7, 0, 0], 1.0),             # one code: 1
    ([2, 1, 0, 1], 2 ** 1.5),        # p = (1/2, 1/4, 1/4): entropy 1.5 bits
])
def test_perplexity_is_the_exponential_of_the_code_entropy(counts, expected):
  np.testing.assert_allclose(diagnostics.perplexity(jnp.array(counts, jnp.float32)), expected,
                             rtol=1e-6)


def test_codes_used_counts_the_codes_chosen_at_least_once():
  assert int(diagnostics.codes_used(jnp.array([2.0, 0.0, 1.0, 0.0, 3.0]))) == 3


def _posterior_means(n):
  """(n, 4) means: dimension 0 varies with variance 1, 1 is constant, 2 has variance 0.0025,
  3 variance 0.04; two of them active at the 0.01 threshold."""
  signs = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
  return jnp.asarray(np.stack([signs, np.full(n, 5.0), 0.05 * signs, 3.0 + 0.2 * signs], -1),
                     jnp.float32)


def test_active_units_count_the_dimensions_whose_mean_varies_over_the_data():
  sums = diagnostics.latent_sums(_posterior_means(8))
  np.testing.assert_allclose(diagnostics.latent_variance(sums), [1.0, 0.0, 0.0025, 0.04],
                             atol=1e-6)
  assert int(diagnostics.active_units(sums)) == 2
  assert int(diagnostics.active_units(sums, threshold=0.001)) == 3


def test_latent_sums_of_batches_add_up_to_those_of_the_data_set_without_padding():
  means = _posterior_means(8)
  padded = jnp.concatenate([means[6:], means[:2]])  # the last batch padded with rows 0 and 1
  batches = [diagnostics.latent_sums(means[:6]),
             diagnostics.latent_sums(padded, jnp.array([1, 1, 0, 0]))]
  total = jax.tree.map(jnp.add, *batches)
  whole = diagnostics.latent_sums(means)
  for name in whole:
    np.testing.assert_allclose(total[name], whole[name], rtol=1e-6)


def test_other_latents_gives_no_image_its_own_latent():
  z = jnp.arange(5.0)[:, None]
  shifted = diagnostics.other_latents(z)
  assert sorted(shifted[:, 0].tolist()) == z[:, 0].tolist()
  assert not np.any(np.asarray(shifted == z))


def _images(key, n=6):
  return jax.random.uniform(key, (n, 4, 4, 1))


def test_z_use_is_zero_for_a_decoder_that_ignores_z():
  images = _images(jax.random.key(0))
  z = images.reshape(len(images), -1)
  m = jnp.concatenate([jnp.ones_like(images), images], -1)
  decode = lambda z, m: 0.5 * m[..., 1:]  # from the observed pixels alone
  own, other = diagnostics.z_use_errors(decode, z, m, images)
  np.testing.assert_array_equal(own, other)
  assert float(diagnostics.z_use(own.sum(), other.sum())) == 0.0


def test_z_use_is_one_for_a_decoder_whose_z_holds_the_whole_image():
  images = _images(jax.random.key(1))
  z = images.reshape(len(images), -1)
  m = jnp.zeros(images.shape[:-1] + (2,))
  decode = lambda z, m: z.reshape(images.shape)  # z is the image itself
  own, other = diagnostics.z_use_errors(decode, z, m, images)
  np.testing.assert_array_equal(own, 0.0)
  assert np.all(np.asarray(other) > 0)
  assert float(diagnostics.z_use(own.sum(), other.sum())) == 1.0


def test_z_use_is_the_fraction_of_the_error_that_the_own_latent_removes():
  np.testing.assert_allclose(diagnostics.z_use(jnp.array(0.25), jnp.array(1.0)), 0.75)
