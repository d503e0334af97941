"""Weighting the proposals of an image's posterior: the tempered importance weights
(posterior_weights), the weighting calibrated for its observed fraction (weighting_index) and
the regression adjustment of the completions for their misfit on the observed pixels.
"""
import jax
import jax.numpy as jnp

from mtvae_jax.completion.settings import (ADJUSTMENT_STEPS, CALIBRATION_FRACTIONS,
                                           TEMPERATURE_RANGE, TEMPERATURE_STEPS)


def regression_adjustment(weights, observed, completions, ridge):
  """The correction d -> d B of a draw's completion for its misfit d = x - observed on the
  observed pixels.

  B is the weighted ridge regression of the completions (n, H, W, C) on
  `observed` (n, H, W, C, 0 at hidden pixels) over the proposals, weights (n,)
  summing to 1: the regression adjustment of approximate Bayesian computation
  (Beaumont, Zhang and Balding, 2002), which moves each draw by what the draws
  say its misfit at the observed pixels implies for the rest, where weighting
  alone only averages the draws that fit best. Solved by ADJUSTMENT_STEPS
  conjugate-gradient steps of (A^T A + ridge I) v = d, A the weighted, centred
  `observed`, so no matrix is factorised. Returns a function (k, H, W, C) ->
  (k, H, W, C).
  """
  def centred(a):
    a = a.reshape(len(a), -1)
    return jnp.sqrt(weights)[:, None] * (a - weights @ a)

  fits, outputs = centred(observed), centred(completions)
  if fits.shape[1] < 2 * ADJUSTMENT_STEPS:   # few pixels: one (P, P) product beats 2 per step
    gram = fits.T @ fits
    normal = lambda v: gram @ v + ridge * v
  else:
    normal = lambda v: fits.T @ (fits @ v) + ridge * v

  def correct(misfit):
    v, _ = jax.scipy.sparse.linalg.cg(normal, misfit.reshape(-1), maxiter=ADJUSTMENT_STEPS)
    return ((fits @ v) @ outputs).reshape(misfit.shape)

  return jax.vmap(correct)


def adjusted_mean(weights, proposals, completions, x, adjust):
  """The weighted mean (H, W, C) of the completions (n, H, W, C), moved by `adjust` (a
  regression_adjustment) for the weighted proposals' misfit on the observed pixels of x."""
  misfit = x - jnp.tensordot(weights, proposals.observed, 1)
  return jnp.tensordot(weights, completions, 1) + adjust(misfit[None])[0]


def effective_size(log_weights):
  """(sum w)^2 / sum w^2 of the weights exp(log_weights) (n,): how many equal weights they are
  worth."""
  return jnp.exp(2.0 * jax.nn.logsumexp(log_weights) - jax.nn.logsumexp(2.0 * log_weights))


def temper(log_ratio, error, ess):
  """(log weights log_ratio - error / t (n,), t) with the temperature t at which the weights'
  effective_size is `ess` (bisection on log t over TEMPERATURE_RANGE; its end where none fits).

  The likelihood exp(-error / t) of a Gaussian observation noise of variance t / 2
  whose size is not known: the neighbours' latents fit a new image's pixels
  less closely than its own latent would, by an amount that varies from image to
  image; tempering to a fixed effective size adapts it per image as the k of
  k nearest neighbours adapts its radius.
  """
  error = error - jnp.min(error)   # finite where any is; inf stays inf
  weights_at = lambda log_t: log_ratio - error * jnp.exp(-log_t)

  def halve(_, bounds):
    low, high = bounds
    middle = 0.5 * (low + high)
    wide_enough = effective_size(weights_at(middle)) >= ess
    return jnp.where(wide_enough, low, middle), jnp.where(wide_enough, middle, high)

  _, log_t = jax.lax.fori_loop(0, TEMPERATURE_STEPS, halve, TEMPERATURE_RANGE)
  return weights_at(log_t), jnp.exp(log_t)


def weighting_index(mask):
  """The CALIBRATION_FRACTIONS entry nearest (on log scales) to the observed fraction of an image
  observed where mask (H, W, 1) is 1."""
  fraction = jnp.maximum(jnp.mean(mask), 1e-6)
  return jnp.argmin(jnp.abs(jnp.log(fraction) - jnp.log(jnp.asarray(CALIBRATION_FRACTIONS))))


def posterior_weights(proposals, source, ess):
  """Tempered log weights (n,) of the proposals, scored by SOURCES[source], and the temperature.

  decoder:                g's error, with the prior's log_ratio, over all proposals;
  neighbours:             the neighbour image's own error, the neighbours equally likely a priori;
  decoder_on_neighbours:  g's error over the neighbours' latents alone, equally likely a priori
                          (the training set's aggregate posterior as p(z); the same as decoder
                          for a Gaussian run, whose proposals are just those).
  """
  flat = jnp.zeros_like(proposals.log_ratio)
  on_neighbours = jnp.where(proposals.own >= 0, proposals.errors['decoder'], jnp.inf)
  log_ratios = jnp.stack([proposals.log_ratio, flat, flat])
  errors = jnp.stack([proposals.errors['decoder'], proposals.errors['neighbours'], on_neighbours])
  return temper(log_ratios[source], errors[source], ess)
