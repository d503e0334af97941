"""Per-example loss terms (thesis 2.1.2, 2.2.2, 3.2). Each returns shape (B,)."""
import jax
import jax.numpy as jnp


def mse(images, recon):
  """(1/D) sum_i (x_i - x_hat_i)^2 over the D = H*W*C values of each image."""
  return jnp.mean(jnp.square(images - recon), axis=(1, 2, 3))


def kl_divergence(mean, log_var):
  """KL(N(mean, exp(log_var)) || N(0, I)) summed over latent dimensions (eq. 2.1)."""
  return 0.5 * jnp.sum(-log_var - 1.0 + jnp.square(mean) + jnp.exp(log_var), axis=-1)


def vq_terms(z_e, z_q, commitment_cost):
  """VQ objective: codebook ||sg(z_e) - e||^2 + beta * commitment ||z_e - sg(e)||^2.

  z_e, z_q: (B, h, w, D) encoder outputs and their nearest codebook vectors.
  Squared norms are summed over D and averaged over the h*w latent vectors
  (the 1/Z sum of the thesis). Returns (codebook, commitment), each (B,).
  """
  sg = jax.lax.stop_gradient
  codebook = jnp.mean(jnp.sum(jnp.square(sg(z_e) - z_q), axis=-1), axis=(1, 2))
  commitment = jnp.mean(jnp.sum(jnp.square(z_e - sg(z_q)), axis=-1), axis=(1, 2))
  return codebook, commitment_cost * commitment


def weighted_sum(terms, weights):
  """sum_t weights[t] * terms[t] over the terms present in both dicts."""
  return sum(weights[name] * value for name, value in terms.items() if name in weights)
