"""Diagnostics of trained models: codebook use, active latent units, a decoder's use of z.

Pure functions of arrays. Each statistic over a data set is built from
per-batch sums that add up across batches (`jnp.add` over the pytrees), so
an evaluation loop over padded batches accumulates them with its other
sums; `weights` (B,) are 1 for real images and 0 for padding.

- VQ-VAE: `code_counts` of the encoder's codes, then `perplexity` (exp of
  the entropy of the code frequencies: K when all K codes are equally used,
  1 when one is) and `codes_used` (codes chosen at least once; the rest are
  dead codes).
- Gaussian VAE: `latent_sums` of the posterior means E_q[z|x], then
  `active_units`: the latent dimensions whose mean varies across the data
  with variance above 0.01 (Burda et al., 2016, arXiv:1509.00519).
- Conditioned decoders: `z_use_errors` decodes each image's m once with its
  own z and once with another image's z; `z_use` = 1 - own / other error is
  0 for a decoder that ignores z and 1 for one whose error z removes entirely.
"""
import jax.numpy as jnp

from mtvae_jax import losses

ACTIVE_UNIT_THRESHOLD = 0.01


def _weights(x, weights):
  return jnp.ones(x.shape[:1], jnp.float32) if weights is None else weights.astype(jnp.float32)


def code_counts(codes, num_embeddings, weights=None):
  """(K,) float32 times each code occurs in `codes` (B, ...) int, images weighted by `weights`."""
  per_code = jnp.broadcast_to(_weights(codes, weights).reshape((-1,) + (1,) * (codes.ndim - 1)),
                              codes.shape)
  return jnp.zeros((num_embeddings,), jnp.float32).at[codes.reshape(-1)].add(per_code.reshape(-1))


def perplexity(counts):
  """exp(-sum_k p_k log p_k) of the frequencies p = counts / sum(counts) (0 log 0 = 0); ()."""
  p = counts / jnp.sum(counts)
  return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))


def codes_used(counts):
  """Number of codes with a count above 0; () int32."""
  return jnp.sum(counts > 0).astype(jnp.int32)


def latent_sums(mean, weights=None):
  """{'count': (), 'sum': (D,), 'sum_sq': (D,)} of posterior means `mean` (B, D), weighted."""
  w = _weights(mean, weights)
  return {'count': jnp.sum(w), 'sum': jnp.einsum('b,bd->d', w, mean),
          'sum_sq': jnp.einsum('b,bd->d', w, jnp.square(mean))}


def latent_variance(sums):
  """(D,) variance over the data of each latent dimension's posterior mean."""
  mean = sums['sum'] / sums['count']
  return jnp.maximum(sums['sum_sq'] / sums['count'] - jnp.square(mean), 0.0)


def active_units(sums, threshold=ACTIVE_UNIT_THRESHOLD):
  """Number of latent dimensions whose posterior mean's variance exceeds `threshold`; () int32."""
  return jnp.sum(latent_variance(sums) > threshold).astype(jnp.int32)


def other_latents(z):
  """z (B, ...) with each image given the next image's latent (the last the first's).

  A cyclic shift, so no image keeps its own z when B >= 2.
  """
  return jnp.roll(z, 1, axis=0)


def z_use_errors(decode, z, m, images):
  """Per-image MSE (B,) of decode(z, m) and of decode(other_latents(z), m) against `images`.

  decode: (z, m) -> reconstructions shaped like images (B, H, W, C).
  """
  return losses.mse(images, decode(z, m)), losses.mse(images, decode(other_latents(z), m))


def z_use(own_error, other_error):
  """1 - own_error / other_error: 0 when z makes no difference, 1 when the right z removes all
  of the error; any shape (e.g. sums over a data set)."""
  return 1.0 - own_error / other_error
