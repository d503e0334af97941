"""Conditioning masks and the conditioning information m (thesis 3.1-3.3).

A mask is one (H, W, 1) float array of 0/1 per image, shared across channels.
Every sampler here is a pure function of a key and a pixel count `k` (which
may be a traced value), so it runs per example under `jax.vmap` inside the
jitted train step.

Sampling types:
  exact:    the same sparse regular grid every time. Pixels are ranked by an
            ordered-dither (Bayer) threshold map, and the mask holds the k
            lowest ranks: for k = H*W / 4**n that is exactly the grid of
            stride 2**n, and for other k it is the densest evenly spread set.
  uniform:  exactly k distinct pixels, uniformly at random.
  gaussian: k draws, with replacement, from a discretised 2-D Gaussian centred
            on the image (repeats allowed, so at most k distinct pixels).

Pixel counts: fixed k (multidecoder method), or per image from the power law
p(u) = a u^(a-1) on [0, 1] as k = floor(D (1 - u)) (single decoder method).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

SAMPLINGS = ('exact', 'uniform', 'gaussian')
COUNTS = ('fixed', 'power_law')


@functools.lru_cache(maxsize=None)
def bayer_ranks(height, width):
  """(H, W) int32 ranks 0..H*W-1 of the ordered-dither pattern.

  The Bayer matrix of side 2**n is built for the smallest n that covers the
  image, cropped to H x W, and its thresholds re-ranked to be contiguous.
  """
  side = 1
  bayer = np.zeros((1, 1), np.int64)
  while side < max(height, width):
    bayer = np.block([[4 * bayer, 4 * bayer + 2], [4 * bayer + 3, 4 * bayer + 1]])
    side *= 2
  # Centre the crop so that coarse grids sit symmetrically in the image.
  top, left = (side - height) // 2, (side - width) // 2
  cropped = bayer[top:top + height, left:left + width]
  ranks = np.empty(height * width, np.int32)
  ranks[np.argsort(cropped, axis=None, kind='stable')] = np.arange(height * width)
  return ranks.reshape(height, width)


def exact_mask(key, k, shape):
  """The fixed grid of k pixels; `key` is unused (same mask every call)."""
  del key
  height, width = shape
  return (jnp.asarray(bayer_ranks(height, width)) < k)[..., None].astype(jnp.float32)


def uniform_mask(key, k, shape):
  """Exactly min(k, H*W) distinct pixels chosen uniformly at random (scores ranked below k)."""
  height, width = shape
  mask = rank_below(jax.random.uniform(key, (height * width,)), k)
  return mask.reshape(height, width, 1).astype(jnp.float32)


def rank_below(scores, k):
  """(N,) scores in [0, 1) -> (N,) bool: argsort(argsort(scores)) < k, without sorting.

  The two sorts cost 35 ms per batch of 128 images of 32x32 on 2 CPU cores
  (XLA's CPU sort is slow), a quarter of a Gaussian train step; this costs 3 ms.
  Bisection over the scores' bit patterns (ordered as the nonnegative
  floats are) finds the k-th smallest score t in 30 counting passes; the
  mask holds the scores below t and, of those equal to t, the first ones
  by index, as the stable argsort ranks them.
  """
  bits = jax.lax.bitcast_convert_type(scores, jnp.int32)

  def halve(_, bounds):  # invariant: count(bits <= low) < k <= count(bits <= high) (or high = 1.0)
    low, high = bounds
    middle = low + (high - low) // 2
    enough = jnp.sum(bits <= middle) >= k
    return jnp.where(enough, low, middle), jnp.where(enough, middle, high)

  one = jax.lax.bitcast_convert_type(jnp.float32(1), jnp.int32)  # above every score; < 2**30
  _, threshold = jax.lax.fori_loop(0, 30, halve, (jnp.int32(-1), one))
  below, ties = bits < threshold, bits == threshold
  return below | (ties & (jnp.cumsum(ties) <= k - jnp.sum(below)))


def gaussian_mask(key, k, shape, std=0.25):
  """k draws with replacement from a centred Gaussian over pixel positions.

  `std` is the standard deviation as a fraction of the image side; the
  Gaussian is restricted to the pixel grid (a categorical over pixels with
  log-probability -d^2 / (2 std^2)). H*W draws are made and the first k kept,
  so the shape is static while k may be traced.
  """
  height, width = shape
  rows = (jnp.arange(height) - (height - 1) / 2) / (std * height)
  cols = (jnp.arange(width) - (width - 1) / 2) / (std * width)
  logits = -0.5 * (rows[:, None] ** 2 + cols[None, :] ** 2).reshape(-1)
  draws = jax.random.categorical(key, logits, shape=(height * width,))
  keep = (jnp.arange(height * width) < k).astype(jnp.float32)
  hits = jnp.zeros(height * width).at[draws].max(keep)
  return hits.reshape(height, width, 1)


SAMPLERS = {'exact': exact_mask, 'uniform': uniform_mask, 'gaussian': gaussian_mask}


def power_law_count(key, num_pixels, exponent):
  """k = floor(D (1 - u)) with u ~ a u^(a-1) on [0, 1] (inverse CDF: u = U^(1/a))."""
  u = jax.random.uniform(key) ** (1.0 / exponent)
  return jnp.floor(num_pixels * (1.0 - u)).astype(jnp.int32)


def power_law_mean_count(num_pixels, exponent):
  """Closed-form E[k] = sum_{j=1..D} (1 - j/D)^a, for checking the sampler."""
  j = np.arange(1, num_pixels + 1)
  return float(np.sum((1.0 - j / num_pixels) ** exponent))


def power_law_empty_fraction(num_pixels, exponent):
  """Closed-form P(k = 0) = 1 - (1 - 1/D)^a."""
  return 1.0 - (1.0 - 1.0 / num_pixels) ** exponent


def sample_mask(key, shape, *, sampling, count, num_pixels, power_law_exponent,
                gaussian_std):
  """One (H, W, 1) mask: draw the pixel count, then the pixels."""
  count_key, pixel_key = jax.random.split(key)
  if count == 'power_law':
    k = power_law_count(count_key, shape[0] * shape[1], power_law_exponent)
  else:
    k = num_pixels
  if sampling == 'gaussian':
    return gaussian_mask(pixel_key, k, shape, gaussian_std)
  return SAMPLERS[sampling](pixel_key, k, shape)


def mask_fn(mask_config, count=None):
  """A `key, (H, W) -> mask` function from the config's `mask` section.

  `count` overrides `mask_config.count` (evaluation always uses the fixed
  count `mask_config.num_pixels`).
  """
  return functools.partial(
      sample_mask,
      sampling=mask_config.sampling,
      count=count or mask_config.count,
      num_pixels=mask_config.num_pixels,
      power_law_exponent=mask_config.power_law_exponent,
      gaussian_std=mask_config.gaussian_std)


def batch_masks(key, images, sampler):
  """(B, H, W, 1) masks, one fresh draw per image (vmapped over keys)."""
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(lambda k: sampler(k, images.shape[1:3]))(keys)


def conditioning(images, masks):
  """m = concat(mask, mask * x) on the channel axis: (B, H, W, 1 + C)."""
  return jnp.concatenate([masks, masks * images], axis=-1)
