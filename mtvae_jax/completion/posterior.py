"""Completing one image: the proposals of its posterior (the latents of the training images
nearest on its observed pixels), its samples, mean and std under either method, and the
jitted function that completes a chunk of images.
"""
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mtvae_jax import masks
from mtvae_jax import methods
from mtvae_jax.completion.families import MODELS
from mtvae_jax.completion.settings import SOURCES, VALUE_RANGE
from mtvae_jax.completion.weighting import (adjusted_mean, posterior_weights,
                                            regression_adjustment, weighting_index)


def _conditioning(run, x, mask):
  """m (1, H, W, 1 + C) of one image, or None for a method without p(x|z, m) (decoder 1 alone)."""
  if not methods.of(run.config).conditioned:
    return None
  return masks.conditioning(x[None], mask[None])


def nearest_rows(x, mask, images, k):
  """Indices (k,) of the images (N, H, W, C) closest to x (H, W, C) on the pixels where mask
  (H, W, 1) is 1, closest first (all N where k > N): the one masked nearest-neighbour search."""
  weights = jnp.broadcast_to(mask, x.shape).reshape(-1)
  flat = images.reshape(len(images), -1)
  distances = jnp.square(flat) @ weights - 2.0 * flat @ (weights * x.reshape(-1))  # less |x|^2
  return jax.lax.top_k(-distances, min(k, len(images)))[1]


def nearest(x, mask, images, k):
  """The k of images (N, H, W, C) closest to x (H, W, C) on the pixels where mask (H, W, 1) is 1."""
  return images[nearest_rows(x, mask, images, k)]


def _decoder(family, variables, m):
  """z (n, ...) -> f(z, m) (n, H, W, C), m (1, H, W, 1 + C) or None."""
  return lambda z: family.decode(variables, z, None if m is None else jnp.broadcast_to(
      m, (len(z), *m.shape[1:])))


class Proposals(NamedTuple):
  """An image's proposals z (n, ...) with log p(z) - log q(z) (n,), the prior's `local` part,
  `own` (n,), `observed` (n, H, W, C), what each proposal puts at the observed pixels (0
  elsewhere): its neighbour image's pixels, or g(z)'s for a proposal of no neighbour; and two
  squared errors (n,) on the observed pixels: of g(z) ('decoder') and of the neighbour image
  ('neighbours'; inf where there is none)."""
  z: Any
  log_ratio: Any
  local: Any
  own: Any
  observed: Any
  errors: dict


def posterior_proposals(key, x, mask, variables, data, search, *, family, settings):
  """Proposals for image x (H, W, C) observed where mask (H, W, 1) is 1: the latents of the
  settings.neighbours training images closest on the observed pixels (VQ: and the pool), or
  settings.num_proposals draws from the model's prior."""
  if settings.neighbours:
    near = nearest(x, mask, search, settings.neighbours)
    z, log_ratio, local, own = family.guided(variables, data, near)
    near_pixels = mask * near[jnp.maximum(own, 0)]
  else:
    z = family.prior(data, key, settings.num_proposals)
    log_ratio, local, own = jnp.zeros(len(z)), None, jnp.full(len(z), -1)
    near_pixels = jnp.zeros((len(z), *x.shape))
  fitted = observed_fit(family, variables, z, mask)
  has_image = (own >= 0).reshape(-1, 1, 1, 1)
  error = lambda values: jnp.sum(jnp.square(values - x), axis=(1, 2, 3))
  return Proposals(z, log_ratio, local, own, jnp.where(has_image, near_pixels, fitted), {
      'decoder': error(fitted), 'neighbours': jnp.where(own >= 0, error(near_pixels), jnp.inf)})


def observed_fit(family, variables, z, mask):
  """g(z) at the pixels where mask (H, W, 1) is 1, 0 elsewhere: (n, H, W, C)."""
  return mask * family.decode(variables, z, None)


def observed_error(family, variables, z, x, mask):
  """sum over the observed pixels of (g(z) - x)^2: (n,); x is 0 at the hidden pixels."""
  return jnp.sum(jnp.square(observed_fit(family, variables, z, mask) - x), axis=(1, 2, 3))


def complete_image(key, x, mask, variables, data, search, *, run, family, noise, method,
                   num_samples, settings):
  """Samples (S, H, W, C) of image x (H, W, C, hidden pixels 0) observed where mask (H, W, 1) is 1,
  with the mean and std (H, W, C) of the completion. search: training images (N, H, W, C).

  Posterior: the mean is importance-weighted over all proposals (a lower-variance
  estimate than the average of the S samples); the samples are resampled
  proposals, drawn from their neighbour's posterior and, where the decoder scores
  them, moved by MCMC. Mean and samples are regression-adjusted to the observed
  pixels (regression_adjustment). The std is the samples' spread with the noise.
  """
  decode = _decoder(family, variables, _conditioning(run, x, mask))
  proposal_key, resample_key, start_key, refine_key, noise_key = jax.random.split(key, 5)
  if method == 'prior':
    z = family.prior(data, proposal_key, num_samples)
    means = decode(z)
    mean = jnp.mean(means, axis=0)
  else:
    proposals = posterior_proposals(proposal_key, x, mask, variables, data, search,
                                    family=family, settings=settings)
    choice = weighting_index(mask)
    source = jnp.asarray([SOURCES.index(name) if settings.neighbours else 0
                          for name, _, _ in noise['weighting']])[choice]   # without neighbours: g
    ess, ridge = jnp.asarray([[ess, ridge] for _, ess, ridge in noise['weighting']],
                             jnp.float32)[choice]
    log_weights, temperature = posterior_weights(proposals, source, ess)
    weights = jax.nn.softmax(log_weights)
    completions = decode(proposals.z)
    adjust = regression_adjustment(weights, proposals.observed, completions, ridge)
    mean = adjusted_mean(weights, proposals, completions, x, adjust)
    chosen = jax.random.categorical(resample_key, log_weights, shape=(num_samples,))
    z = family.start(proposals.local, start_key, proposals.z[chosen], proposals.own[chosen])
    moved = family.refine(data, proposals.local, refine_key, z,
                          lambda z: -observed_error(family, variables, z, x, mask) / temperature,
                          settings.num_steps)
    z = jax.tree.map(lambda a, b: jnp.where(source == 0, a, b), moved, z)
    means = decode(z) + adjust(x - proposals.observed[chosen])
  scale = jnp.where(mask > 0, noise['observed'], noise['hidden'])
  samples = jnp.clip(means + scale * jax.random.normal(noise_key, means.shape), *VALUE_RANGE)
  return samples, mean, jnp.sqrt(jnp.var(means, axis=0) + scale ** 2)


def completion_fn(completer, method, num_samples, settings):
  """jit of (keys (B,), x (B, H, W, C), mask (B, H, W, 1)) -> samples (B, S, H, W, C), mean, std;
  made once per completer and arguments."""
  run, family = completer.run, completer.family
  if MODELS[run.config.model].pool:  # the whole pool is the proposals
    settings = settings._replace(num_proposals=MODELS[run.config.model].pool)
  key = (method, num_samples, settings)
  if key not in completer.functions:
    per_image = functools.partial(complete_image, run=run, family=family, noise=completer.noise,
                                  method=method, num_samples=num_samples, settings=settings)
    completer.functions[key] = jax.jit(jax.vmap(per_image, in_axes=(0, 0, 0, None, None, None)))
  batched = completer.functions[key]
  variables = {'params': run.state.params, 'batch_stats': run.state.batch_stats}
  return lambda keys, x, mask: batched(keys, x, mask, variables, family.data, completer.search)
