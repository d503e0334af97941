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
p(u) = a u^(a-1) on [0, 1] as k = floor(D (1 - u)) (single decoder method),
which puts most counts near 0 (a few percent of the pixels for a = 40), or
log-uniform: k + 1 = floor((F D + 2)^U), U uniform on [0, 1], which gives each
doubling of the count the same probability up to the fraction F of the pixels,
so that sparse and half-observed images are both common.

Mixture: sampling='mixture' draws one of the three samplers per image and
count='mixture' one of the three counts per image, each with probabilities
proportional to the given weights, so that one trained decoder serves any
layout and density of observed pixels.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

SAMPLINGS = ('exact', 'uniform', 'gaussian')
COUNTS = ('fixed', 'power_law', 'log_uniform')
MIXTURE = 'mixture'  # a value of mask.sampling and mask.count: one of the above per image


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

  XLA's CPU sort is slow: the two sorts would cost a sizeable share of a
  train step on CPUs, this a small fraction of it.
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
  log-probability -d^2 / (2 std^2)). That categorical is the product of one
  over rows and one over columns, each drawn by inverse CDF. H*W draws are
  made and the first k kept, so the shape is static while k may be traced.
  """
  height, width = shape

  def axis(key, side):  # H*W draws of a row (column) index
    logits = -0.5 * jnp.square((jnp.arange(side) - (side - 1) / 2) / (std * side))
    return jax.random.choice(key, side, (height * width,), p=jax.nn.softmax(logits))

  row_key, col_key = jax.random.split(key)
  draws = axis(row_key, height) * width + axis(col_key, width)
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


def log_uniform_count(key, num_pixels, max_fraction):
  """k = floor((M + 2)^U) - 1 for M = floor(F D), U uniform on [0, 1): k in 0..M, P(k <= j) =
  log(j + 2) / log(M + 2)."""
  top = jnp.log(jnp.floor(max_fraction * num_pixels) + 2.0)
  return (jnp.floor(jnp.exp(top * jax.random.uniform(key))) - 1.0).astype(jnp.int32)


def pixel_count(key, num_pixels, *, count, fixed_count, power_law_exponent, max_fraction):
  """The observed-pixel count of one mask of `num_pixels` pixels, drawn by `count` (COUNTS)."""
  if count == 'power_law':
    return power_law_count(key, num_pixels, power_law_exponent)
  if count == 'log_uniform':
    return log_uniform_count(key, num_pixels, max_fraction)
  return jnp.int32(fixed_count)


def choose(key, weights, draw):
  """draw(name) for one name of `weights` ({name: weight >= 0}) drawn in proportion to its weight.

  Every name of positive weight is drawn and one result picked, so the
  choice is traced (it differs per image under vmap).
  """
  names = [name for name, weight in weights.items() if weight > 0]
  logits = jnp.log(jnp.asarray([weights[name] for name in names], jnp.float32))
  return jnp.stack([draw(name) for name in names])[jax.random.categorical(key, logits)]


def sample_mask(key, shape, *, sampling, count, num_pixels, power_law_exponent,
                gaussian_std, max_fraction=0.5, sampling_weights=None, count_weights=None):
  """One (H, W, 1) mask: draw the pixel count, then the pixels.

  sampling: SAMPLINGS or MIXTURE (drawn by `sampling_weights`, {sampling: weight});
  count: COUNTS or MIXTURE (drawn by `count_weights`, {count: weight}).
  """
  count_key, pixel_key = jax.random.split(key)
  count_fn = functools.partial(pixel_count, num_pixels=shape[0] * shape[1], fixed_count=num_pixels,
                               power_law_exponent=power_law_exponent, max_fraction=max_fraction)
  if count == MIXTURE:
    choice_key, count_key = jax.random.split(count_key)
    k = choose(choice_key, count_weights, lambda name: count_fn(count_key, count=name))
  else:
    k = count_fn(count_key, count=count)
  samplers = dict(SAMPLERS, gaussian=functools.partial(gaussian_mask, std=gaussian_std))
  pixels_fn = lambda name, key: samplers[name](key, k, shape)
  if sampling == MIXTURE:
    choice_key, pixel_key = jax.random.split(pixel_key)
    return choose(choice_key, sampling_weights, lambda name: pixels_fn(name, pixel_key))
  return pixels_fn(sampling, pixel_key)


def mask_fn(mask_config, count=None):
  """A `key, (H, W) -> mask` function from the config's `mask` section.

  `count` overrides `mask_config.count` (evaluation always uses the fixed
  count `mask_config.num_pixels`, which config.resolve_for_images sets for the images).
  """
  if mask_config.num_pixels < 0:
    raise ValueError(f'mask.num_pixels={mask_config.num_pixels} stands for a grid of the image '
                     'size: resolve the config for the images first (config.resolve_for_images)')
  mixture = mask_config.mixture
  return functools.partial(
      sample_mask,
      sampling=mask_config.sampling,
      count=count or mask_config.count,
      num_pixels=mask_config.num_pixels,
      power_law_exponent=mask_config.power_law_exponent,
      gaussian_std=mask_config.gaussian_std,
      max_fraction=mask_config.max_fraction,
      sampling_weights=dict(mixture.sampling_weights),
      count_weights=dict(mixture.count_weights))


def batch_masks(key, images, sampler):
  """(B, H, W, 1) masks, one fresh draw per image (vmapped over keys)."""
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(lambda k: sampler(k, images.shape[1:3]))(keys)


def conditioning(images, masks):
  """m = concat(mask, mask * x) on the channel axis: (B, H, W, 1 + C)."""
  return jnp.concatenate([masks, masks * images], axis=-1)
