"""The predictive distribution of a posterior completion at the hidden pixels, and its calibration.

Its mean blends predictors (H, W, C) of the hidden pixels: the posterior mean,
the mean of the NEIGHBOUR_SAMPLES training images nearest on the observed
pixels, and smoothings of the observed pixels (`smooth`), with least-squares
weights. Its samples add to that mean structured residuals, scaled: sample i's
posterior draw around the posterior mean, and neighbour i mod NEIGHBOUR_SAMPLES
around the neighbours' mean, then noise of a share of s_hid. Weights and scales
are chosen per observed fraction on validation images (`fit_blend` on the
squared error, `choose_spread` on the CRPS).
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from mtvae_jax.completion.settings import VALUE_RANGE

NEIGHBOUR_SAMPLES = 16   # nearest training images behind the neighbours' mean and residuals
SMOOTHING_WIDTHS = (0.35, 0.7)   # Gaussian widths of `smooth`, in observed pixels' spacings
PREDICTORS = ('posterior', 'neighbours') + tuple(f'smooth_{w:g}' for w in SMOOTHING_WIDTHS)
# Candidate (posterior draws' residual scale, neighbours' residual scale, noise share of s_hid).
SPREADS = [list(spread) for spread in itertools.product(
    (0.0, 0.5, 1.0, 1.5), (0.0, 0.5, 1.0, 1.25), (0.0, 0.5))
           if any(spread)]
BLEND_RIDGE = 1e-6   # relative ridge of fit_blend's normal equations
# The blends tried beside fit_blend's: the neighbours' mean alone, which with the neighbours'
# residuals at scale 1 reproduces their samples, so the choice never scores below them.
FIXED_BLENDS = [[float(name == 'neighbours') for name in PREDICTORS]]
COVERAGE_RANGE = (0.80, 0.97)   # calibrated share of hidden values inside the 90 % interval


def crps(samples, truth):
  """Per value CRPS of the empirical distribution of `samples` (N, S, ...) at `truth` (N, ...).

  E|X - y| - E|X - X'| / 2, the second term from the sorted samples as
  sum_i (2 i - S - 1) x_(i) / S^2 (i = 1..S).
  """
  num = samples.shape[1]
  spread = jnp.sort(samples, axis=1)
  weights = (2.0 * jnp.arange(1, num + 1) - num - 1).reshape(1, num, *[1] * (samples.ndim - 2))
  return (jnp.mean(jnp.abs(samples - truth[:, None]), axis=1)
          - jnp.sum(weights * spread, axis=1) / num ** 2)


def inside_interval(samples, truth, level=0.9):
  """Per value 1.0 where `truth` (N, ...) lies within the central `level` interval of `samples`
  (N, S, ...), from their linearly interpolated empirical quantiles, else 0.0."""
  ordered = jnp.sort(samples, axis=1)
  last = samples.shape[1] - 1

  def quantile(q):  # x_(i) + f (x_(i+1) - x_(i)): exact where the two are equal
    below, fraction = divmod(q * last, 1.0)
    below = int(below)
    return ordered[:, below] + fraction * (ordered[:, min(below + 1, last)] - ordered[:, below])

  inside = (truth >= quantile((1 - level) / 2)) & (truth <= quantile((1 + level) / 2))
  return inside.astype(jnp.float32)


def smooth(x, mask, width):
  """Normalised convolution of the observed pixels of x (H, W, C), mask (H, W, 1): a Gaussian of
  `width` times their spacing 1 / sqrt(observed fraction); their mean where it reaches none."""
  sigma = width / jnp.sqrt(jnp.maximum(jnp.mean(mask), 1e-6))
  kernel = lambda n: jnp.exp(-0.5 * jnp.square((jnp.arange(n)[:, None] - jnp.arange(n)) / sigma))
  blur = lambda a: jnp.einsum('ij,jkc,lk->ilc', kernel(x.shape[0]), a, kernel(x.shape[1]))
  mask = jnp.broadcast_to(mask, x.shape)
  values, weights = blur(x * mask), blur(mask)
  mean = jnp.sum(x * mask, axis=(0, 1)) / jnp.maximum(jnp.sum(mask, axis=(0, 1)), 1.0)
  return jnp.where(weights > 1e-20, values / jnp.maximum(weights, 1e-20), mean)


def parts(x, mask, posterior_mean, draws, near):
  """What the predictive distribution is built from: predictors (len(PREDICTORS), H, W, C) and
  residuals (2, S, H, W, C) of the S posterior draws and of the neighbours, near (k, H, W, C)
  closest first."""
  near = near[:NEIGHBOUR_SAMPLES]
  near_mean = jnp.mean(near, axis=0)
  predictors = jnp.stack([posterior_mean, near_mean]
                         + [smooth(x, mask, width) for width in SMOOTHING_WIDTHS])
  neighbours = near[jnp.arange(len(draws)) % len(near)] - near_mean
  return predictors, jnp.stack([draws - posterior_mean, neighbours])


def predict(key, predictors, residuals, blend, spread, noise):
  """(samples (S, H, W, C) clipped to VALUE_RANGE, mean, std (H, W, C)) at the hidden pixels
  under blend weights (len(PREDICTORS),) and spread (3,); noise: s_hid."""
  mean = jnp.tensordot(blend, predictors, 1)
  varied = mean + jnp.tensordot(spread[:2], residuals, 1)
  scale = spread[2] * noise
  samples = jnp.clip(varied + scale * jax.random.normal(key, varied.shape), *VALUE_RANGE)
  return samples, mean, jnp.sqrt(jnp.var(varied, axis=0) + scale ** 2)


def fit_blend(predictors, truth, hidden):
  """Least-squares weights (len(PREDICTORS),) of predictors (N, P, H, W, C) for truth (N, H, W, C)
  over the hidden pixels (N, H, W, C of 0/1)."""
  flat = (predictors * hidden[:, None]).reshape(len(truth), predictors.shape[1], -1)
  gram = jnp.einsum('npv,nqv->pq', flat, flat)
  target = jnp.einsum('npv,nv->p', flat, (truth * hidden).reshape(len(truth), -1))
  ridge = BLEND_RIDGE * jnp.trace(gram) * jnp.eye(len(gram))
  return jnp.linalg.solve(gram + ridge, target)


@jax.jit
def spread_scores(key, predictors, residuals, truth, hidden, blends, noise):
  """Mean hidden-pixel CRPS and coverage90, each (len(blends), len(SPREADS)), of the samples
  under each blend (B, len(PREDICTORS)) and SPREADS entry."""
  keys = jax.random.split(key, len(truth))

  def score(choice):
    blend, spread = choice
    samples, _, _ = jax.vmap(predict, in_axes=(0, 0, 0, None, None, None))(
        keys, predictors, residuals, blend, spread, noise)
    mean = lambda values: jnp.sum(values * hidden) / jnp.sum(hidden)
    return mean(crps(samples, truth)), mean(inside_interval(samples, truth))

  spreads = jnp.asarray(SPREADS, jnp.float32)
  pairs = (jnp.repeat(blends, len(spreads), axis=0), jnp.tile(spreads, (len(blends), 1)))
  scores, coverage = jax.lax.map(score, pairs)
  return scores.reshape(len(blends), -1), coverage.reshape(len(blends), -1)


def calibrate(key, predictors, residuals, truth, hidden, noise):
  """{'blend', 'spread'}: of fit_blend's weights and FIXED_BLENDS, and of SPREADS, the pair whose
  samples have the lowest CRPS among those whose coverage90 lies in COVERAGE_RANGE (the
  nearest to it when none does), for the predictors (N, P, H, W, C) and residuals
  (N, 2, S, H, W, C) of validation images."""
  blends = jnp.concatenate([fit_blend(predictors, truth, hidden)[None],
                            jnp.asarray(FIXED_BLENDS, jnp.float32)])
  scores, coverage = map(np.asarray, spread_scores(key, predictors, residuals, truth, hidden,
                                                   blends, noise))
  low, high = COVERAGE_RANGE
  miss = np.maximum(low - coverage, 0.0) + np.maximum(coverage - high, 0.0)
  best = np.unravel_index(np.lexsort((scores.ravel(), miss.ravel()))[0], scores.shape)
  return {'blend': [float(w) for w in np.asarray(blends[best[0]])], 'spread': SPREADS[best[1]]}


def valid(row):
  """Whether `row` (JSON content) is one of calibrate's results."""
  return (isinstance(row, dict) and set(row) == {'blend', 'spread'}
          and isinstance(row['blend'], list) and len(row['blend']) == len(PREDICTORS)
          and all(type(w) is float and np.isfinite(w) for w in row['blend'])
          and row['spread'] in SPREADS)
