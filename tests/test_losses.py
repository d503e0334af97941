import jax
import jax.numpy as jnp
import numpy as np

from mtvae_jax import losses
from mtvae_jax.models import vq


def test_mse_averages_over_pixels_per_image():
  x = jnp.zeros((2, 2, 2, 1))
  x_hat = x.at[0].set(1.0).at[1, 0, 0, 0].set(2.0)
  np.testing.assert_allclose(losses.mse(x, x_hat), [1.0, 1.0])


def test_kl_matches_hand_computed_value():
  mean = jnp.array([[0.0, 1.0], [0.5, -2.0]])
  log_var = jnp.array([[0.0, np.log(2.0)], [np.log(0.5), 0.0]])
  # 0.5 * sum(-log s2 - 1 + mu^2 + s2)
  expected = [0.5 * ((0 - 1 + 0 + 1) + (-np.log(2) - 1 + 1 + 2)),
              0.5 * ((-np.log(0.5) - 1 + 0.25 + 0.5) + (0 - 1 + 4 + 1))]
  np.testing.assert_allclose(losses.kl_divergence(mean, log_var), expected, rtol=1e-6)


def test_kl_is_zero_for_the_prior():
  np.testing.assert_allclose(losses.kl_divergence(jnp.zeros((3, 5)), jnp.zeros((3, 5))), 0.0)


def test_vq_terms_match_hand_computed_values():
  z_e = jnp.array([[1.0, 2.0], [0.0, 0.0]]).reshape(1, 1, 2, 2)
  z_q = jnp.array([[1.0, 0.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
  codebook, commitment = losses.vq_terms(z_e, z_q, commitment_cost=0.25)
  # squared distances 4 and 25, averaged over the two latent vectors
  np.testing.assert_allclose(codebook, [14.5])
  np.testing.assert_allclose(commitment, [0.25 * 14.5])


def test_vq_terms_send_gradients_to_the_right_side():
  z_e = jnp.ones((1, 1, 1, 2))
  z_q = jnp.zeros((1, 1, 1, 2))
  grad_codebook = jax.grad(lambda e, q: losses.vq_terms(e, q, 0.25)[0].sum(), argnums=(0, 1))
  g_e, g_q = grad_codebook(z_e, z_q)
  np.testing.assert_array_equal(g_e, 0.0)  # codebook term moves the codebook only
  assert float(jnp.abs(g_q).sum()) > 0
  grad_commit = jax.grad(lambda e, q: losses.vq_terms(e, q, 0.25)[1].sum(), argnums=(0, 1))
  g_e, g_q = grad_commit(z_e, z_q)
  np.testing.assert_array_equal(g_q, 0.0)  # commitment term moves the encoder only
  np.testing.assert_allclose(g_e, 0.25 * 2 * (z_e - z_q))


def test_straight_through_gradient_reaching_z_e_equals_gradient_at_z_q():
  quantizer = vq.VectorQuantizer(num_embeddings=8, embedding_dim=3)
  z_e = jax.random.normal(jax.random.key(0), (2, 2, 2, 3))
  params = quantizer.init(jax.random.key(1), z_e)
  weights = jax.random.normal(jax.random.key(2), z_e.shape)
  downstream = lambda z: jnp.sum(jnp.sin(z) * weights)

  def through_quantizer(z):
    z_st, _, _ = quantizer.apply(params, z)
    return downstream(z_st)

  _, z_q, codes = quantizer.apply(params, z_e)
  np.testing.assert_allclose(jax.grad(through_quantizer)(z_e), jax.grad(downstream)(z_q), rtol=1e-6)
  # and the forward value is the nearest codebook vector
  codebook = params['params']['codebook']
  distances = ((np.asarray(z_e)[..., None, :] - np.asarray(codebook)) ** 2).sum(-1)
  np.testing.assert_array_equal(codes, distances.argmin(-1))
  np.testing.assert_allclose(z_q, np.asarray(codebook)[distances.argmin(-1)])


def test_codebook_lookup_is_exact_and_its_gradient_sums_each_codes_positions():
  quantizer = vq.VectorQuantizer(num_embeddings=6, embedding_dim=4)
  params = quantizer.init(jax.random.key(0), jnp.zeros((1, 4)))
  codebook = np.asarray(params['params']['codebook'])
  codes = jnp.array([[0, 5, 5], [2, 5, 0]])
  weights = jax.random.normal(jax.random.key(1), (2, 3, 4))
  lookup = lambda p: quantizer.apply(p, codes, method=quantizer.lookup)
  np.testing.assert_array_equal(lookup(params), codebook[np.asarray(codes)])  # bit for bit
  grad = jax.grad(lambda p: jnp.sum(lookup(p) * weights))(params)['params']['codebook']
  expected = np.zeros_like(codebook)
  np.add.at(expected, np.asarray(codes), np.asarray(weights))
  np.testing.assert_allclose(grad, expected, rtol=1e-6)  # rows 1, 3, 4 unused: zero
