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
from mtvae_jax.completion import predictive
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


def posterior_proposals(key, x, mask, variables, data, near, *, family, settings):
  """Proposals for image x (H, W, C) observed where mask (H, W, 1) is 1: the latents of the
  settings.neighbours training images `near` (closest first) (VQ: and the pool), or
  settings.num_proposals draws from the model's prior."""
  if settings.neighbours:
    near = near[:settings.neighbours]
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


def neighbour_count(settings):
  """Training images each posterior completion searches for: its proposals' and the predictive
  distribution's."""
  return max(settings.neighbours, predictive.NEIGHBOUR_SAMPLES)


def weighting_table(weighting):
  """noise.json's weighting rows [[source, ess, ridge]] as arrays (one entry per row), arguments
  of the jitted completion rather than constants in it."""
  return {'source': jnp.asarray([SOURCES.index(source) for source, _, _ in weighting]),
          'ess': jnp.asarray([ess for _, ess, _ in weighting], jnp.float32),
          'ridge': jnp.asarray([ridge for _, _, ridge in weighting], jnp.float32)}


def posterior_parts(key, x, mask, variables, data, search, weighting, *, run, family, num_samples,
                    settings):
  """predictive.parts of image x (H, W, C, hidden pixels 0) observed where mask (H, W, 1) is 1,
  and its S = num_samples posterior draws' completions (S, H, W, C). weighting: weighting_table.

  The posterior mean is importance-weighted over all proposals (a lower-variance
  estimate than the average of the S draws); the draws are resampled proposals,
  drawn from their neighbour's posterior and, where the decoder scores them,
  moved by MCMC. Mean and draws are regression-adjusted to the observed pixels
  (regression_adjustment). search: training images (N, H, W, C).
  """
  decode = _decoder(family, variables, _conditioning(run, x, mask))
  proposal_key, resample_key, start_key, refine_key = jax.random.split(key, 4)
  near = nearest(x, mask, search, neighbour_count(settings))
  proposals = posterior_proposals(proposal_key, x, mask, variables, data, near, family=family,
                                  settings=settings)
  choice = weighting_index(mask)
  source = weighting['source'][choice] if settings.neighbours else 0   # without neighbours: g
  log_weights, temperature = posterior_weights(proposals, source, weighting['ess'][choice])
  weights = jax.nn.softmax(log_weights)
  completions = decode(proposals.z)
  adjust = regression_adjustment(weights, proposals.observed, completions,
                                 weighting['ridge'][choice])
  mean = adjusted_mean(weights, proposals, completions, x, adjust)
  chosen = jax.random.categorical(resample_key, log_weights, shape=(num_samples,))
  z = family.start(proposals.local, start_key, proposals.z[chosen], proposals.own[chosen])
  if settings.num_steps:
    moved = family.refine(data, proposals.local, refine_key, z,
                          lambda z: -observed_error(family, variables, z, x, mask) / temperature,
                          settings.num_steps)
    z = jax.tree.map(lambda a, b: jnp.where(source == 0, a, b), moved, z)
  draws = decode(z) + adjust(x - proposals.observed[chosen])
  return predictive.parts(x, mask, mean, draws, near), draws


def parts_function(functions, run, family, num_samples, settings):
  """jit of (keys (B,), x (B, H, W, C), mask (B, H, W, 1), variables, data, search, weighting) ->
  posterior_parts of each image; made once per `functions` (a Completer's) and arguments, and
  shared by the calibration and the completions."""
  if MODELS[run.config.model].pool:  # the whole pool is the proposals
    settings = settings._replace(num_proposals=MODELS[run.config.model].pool)
  key = ('parts', num_samples, settings)
  if key not in functions:
    functions[key] = jax.jit(jax.vmap(functools.partial(
        posterior_parts, run=run, family=family, num_samples=num_samples, settings=settings),
                                      in_axes=(0, 0, 0, None, None, None, None)))
  return functions[key]


def finish_posterior(key, mask, parts, draws, tables):
  """Samples (S, H, W, C), mean and std (H, W, C) of an image observed where mask (H, W, 1) is 1,
  from its posterior_parts: at the observed pixels its draws with noise s_obs, at the hidden ones
  the predictive distribution of the calibration for the observed fraction nearest its own.
  tables: the noise scales, and the predictive rows as arrays."""
  noise_key, predictive_key = jax.random.split(key)
  choice = weighting_index(mask)
  predictors, residuals = parts
  hidden = predictive.predict(predictive_key, predictors, residuals, tables['blend'][choice],
                              tables['spread'][choice], tables['hidden'])
  scale = tables['observed']
  observed = (jnp.clip(draws + scale * jax.random.normal(noise_key, draws.shape), *VALUE_RANGE),
              predictors[0], jnp.sqrt(jnp.var(draws, axis=0) + scale ** 2))
  return tuple(jnp.where(mask > 0, seen, unseen) for seen, unseen in zip(observed, hidden))


def posterior_completion(completer, num_samples, settings):
  """(keys (B,), x (B, H, W, C), mask (B, H, W, 1)) -> samples (B, S, H, W, C), mean, std."""
  run, family, noise = completer.run, completer.family, completer.noise
  parts = parts_function(completer.functions, run, family, num_samples, settings)
  finish = jax.jit(jax.vmap(finish_posterior, in_axes=(0, 0, 0, 0, None)))
  weighting = weighting_table(noise['weighting'])
  tables = {name: jnp.asarray([row[name] for row in noise['predictive']], jnp.float32)
            for name in ('blend', 'spread')}
  tables.update(observed=noise['observed'], hidden=noise['hidden'])
  variables = {'params': run.state.params, 'batch_stats': run.state.batch_stats}

  def complete(keys, x, mask):
    parts_keys, finish_keys = jnp.split(jax.vmap(jax.random.split)(keys), 2, axis=1)
    out, draws = parts(parts_keys[:, 0], x, mask, variables, family.data, completer.search,
                       weighting)
    return finish(finish_keys[:, 0], mask, out, draws, tables)

  return complete


def prior_image(key, x, mask, variables, data, *, run, family, noise, num_samples):
  """Samples (S, H, W, C), mean and std (H, W, C) of image x observed where mask is 1 from prior
  draws z: f(z, m) with noise of scale s_obs / s_hid at the observed / hidden pixels."""
  sample_key, noise_key = jax.random.split(key)
  scale = jnp.where(mask > 0, noise['observed'], noise['hidden'])
  means = _decoder(family, variables, _conditioning(run, x, mask))(
      family.prior(data, sample_key, num_samples))
  samples = jnp.clip(means + scale * jax.random.normal(noise_key, means.shape), *VALUE_RANGE)
  return samples, jnp.mean(means, axis=0), jnp.sqrt(jnp.var(means, axis=0) + scale ** 2)


def prior_completion(completer, num_samples, settings):
  """(keys (B,), x (B, H, W, C), mask (B, H, W, 1)) -> samples (B, S, H, W, C), mean, std."""
  del settings
  run, family = completer.run, completer.family
  batched = jax.jit(jax.vmap(functools.partial(
      prior_image, run=run, family=family, num_samples=num_samples,
      noise={name: completer.noise[name] for name in ('observed', 'hidden')}),
                             in_axes=(0, 0, 0, None, None)))
  variables = {'params': run.state.params, 'batch_stats': run.state.batch_stats}
  return lambda keys, x, mask: batched(keys, x, mask, variables, family.data)


COMPLETIONS = {'posterior': posterior_completion, 'prior': prior_completion}


def completion_fn(completer, method, num_samples, settings):
  """(keys (B,), x (B, H, W, C), mask (B, H, W, 1)) -> samples (B, S, H, W, C), mean, std of the
  method's completions (COMPLETIONS); made once per completer and arguments."""
  key = (method, num_samples, settings)
  if key not in completer.functions:
    completer.functions[key] = COMPLETIONS[method](completer, num_samples, settings)
  return completer.functions[key]
