"""Calibrating a run's completion on its validation images: the noise scales s_obs and s_hid,
the weighting and the predictive distribution chosen per observed fraction, and their cache
(noise.json) with what it is made from.
"""
import functools
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from mtvae_jax import loop
from mtvae_jax import masks
from mtvae_jax import methods
from mtvae_jax.completion.cache import cached, fingerprint
from mtvae_jax.completion.families import MODELS
from mtvae_jax.completion import predictive
from mtvae_jax.completion.inputs import chunk_size
from mtvae_jax.completion.posterior import (_conditioning, _decoder, nearest, neighbour_count,
                                            parts_function, posterior_proposals, weighting_table)
from mtvae_jax.completion.settings import (CACHE_DIR, CALIBRATION_FRACTIONS, CALIBRATION_IMAGES,
                                           CALIBRATION_SAMPLES, CANDIDATES, ESS_TARGETS,
                                           NOISE_IMAGES, POOL_SIZE, RIDGES, SOURCES, Settings)
from mtvae_jax.completion.weighting import adjusted_mean, posterior_weights, regression_adjustment


def residual_sums(state, images, weights, key, *, config):
  """Squared residuals and pixel counts of the completing decoder f given the encoder's z, on the
  observed and the hidden pixels.

  Masks come from the run's training distribution (config.mask); a method
  without p(x|z, m) has no mask (f is g), all its pixels count as observed.
  """
  mask_key, z_key = jax.random.split(key)
  if not methods.of(config).conditioned:
    mask = jnp.ones((*images.shape[:3], 1))
    conds = {'out': None}   # f is g
  else:
    mask = masks.batch_masks(mask_key, images, masks.mask_fn(config.mask))
    conds = {'out': masks.conditioning(images, mask)}
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  outputs, _ = state.apply_fn(variables, images, conds, z_key, train=False)
  squared = jnp.square(outputs['out'] - images)
  rows = weights[:, None, None, None]
  return {'observed': jnp.sum(squared * mask * rows), 'hidden': jnp.sum(squared * (1 - mask) * rows),
          'observed_pixels': jnp.sum(jnp.broadcast_to(mask, images.shape) * rows),
          'hidden_pixels': jnp.sum(jnp.broadcast_to(1 - mask, images.shape) * rows)}


def calibration_errors(key, truth, mask, variables, data, search, *, run, family, settings):
  """Squared errors (len(SOURCES), len(ESS_TARGETS), len(RIDGES)) on the hidden pixels of image
  truth (H, W, C), observed where mask (H, W, 1) is 1, of the posterior mean under each weighting
  and adjustment."""
  x = truth * mask
  near = nearest(x, mask, search, neighbour_count(settings))
  proposals = posterior_proposals(key, x, mask, variables, data, near, family=family,
                                  settings=settings)
  completions = _decoder(family, variables, _conditioning(run, x, mask))(proposals.z)
  hidden = jnp.broadcast_to(1 - mask, truth.shape)

  def squared_errors(source, ess):   # (len(RIDGES),)
    weights = jax.nn.softmax(posterior_weights(proposals, source, ess)[0])
    mean = lambda ridge: adjusted_mean(weights, proposals, completions, x, regression_adjustment(
        weights, proposals.observed, completions, ridge))
    return jax.vmap(lambda ridge: jnp.sum(jnp.square(mean(ridge) - truth) * hidden))(
        jnp.asarray(RIDGES))

  sources = jnp.arange(len(SOURCES) if settings.neighbours else 1)
  return jax.vmap(lambda source: jax.vmap(lambda ess: squared_errors(source, ess))(
      jnp.asarray(ESS_TARGETS)))(sources)


def calibration_masks(key, count, num, shape):
  """Masks (num, H, W, 1) of `count` pixels: the first half at random (scattered, as a user's
  sensors are), the others on the evenly spread grid."""
  keys = jax.random.split(key, num)
  half = num // 2
  return jnp.concatenate([jax.vmap(lambda key: masks.SAMPLERS[sampling](key, count, shape))(part)
                          for sampling, part in (('uniform', keys[:half]), ('exact', keys[half:]))])


def _chunked(fn, size, *arrays):
  """fn over whole chunks of `size` rows of the arrays (one shape: one compilation), the results'
  leaves concatenated; the rows of a last partial chunk are left out."""
  outs = [jax.device_get(fn(*(a[start:start + size] for a in arrays)))
          for start in range(0, len(arrays[0]) - size + 1, size)]
  return jax.tree.map(lambda *parts: np.concatenate(parts), *outs)


def calibrate(run, family, search, scales, functions, settings=Settings()):
  """{'weighting': [[source, ess, ridge]], 'predictive': [predictive.calibrate's choice]}, one
  per CALIBRATION_FRACTIONS entry, on CALIBRATION_IMAGES validation images observed at that
  fraction of their pixels (calibration_masks). scales: {'observed': s_obs, 'hidden': s_hid};
  functions: the Completer's, where the posterior's parts are compiled once for the completions.

  The weighting: the SOURCES, ESS_TARGETS and RIDGES entries whose posterior mean
  has the lowest hidden-pixel error. Which source scores proposals better
  depends on how many pixels are observed: with a few, g's own reconstruction
  error at them outweighs the differences between the neighbours, whose own
  pixels then rank them better. The predictive distribution: its blend and
  spread under that weighting (predictive.calibrate).
  """
  images = jnp.asarray(run.splits.validation[:CALIBRATION_IMAGES])
  variables = {'params': run.state.params, 'batch_stats': run.state.batch_stats}
  errors_fn = jax.jit(jax.vmap(
      functools.partial(calibration_errors, run=run, family=family, settings=settings),
      in_axes=(0, 0, 0, None, None, None)))
  size = chunk_size(len(images), CALIBRATION_SAMPLES, settings, run.config.model)
  pixels = math.prod(images.shape[1:3])
  keys, fraction_masks, weighting = [], [], []
  for index, fraction in enumerate(CALIBRATION_FRACTIONS):
    mask_key, key = jax.random.split(jax.random.fold_in(run.eval_key, 2 + index))
    mask = calibration_masks(mask_key, max(1, round(fraction * pixels)), len(images),
                             images.shape[1:3])
    keys.append(jax.random.split(key, len(images)))
    fraction_masks.append(mask)
    errors = np.sum(_chunked(lambda *a: errors_fn(*a, variables, family.data, search), size,
                             keys[-1], images, mask), axis=0)
    source, ess, ridge = np.unravel_index(np.argmin(errors), errors.shape)
    weighting.append([SOURCES[source], ESS_TARGETS[ess], RIDGES[ridge]])
  parts_fn = parts_function(functions, run, family, CALIBRATION_SAMPLES, settings)
  table = weighting_table(weighting)
  rows = []
  for key, mask in zip(keys, fraction_masks):
    x = images * mask
    (predictors, residuals), _ = _chunked(
        lambda *a: parts_fn(*a, variables, family.data, search, table), size, key, x, mask)
    used = len(predictors)
    hidden = jnp.broadcast_to(1 - mask[:used], images[:used].shape)
    rows.append(predictive.calibrate(key[0], predictors, residuals, images[:used], hidden,
                                     scales['hidden']))
  return {'weighting': weighting, 'predictive': rows}


def estimate_noise(run, family, search, functions):
  """{'observed': s_obs, 'hidden': s_hid, calibrate's choices, 'candidates': CANDIDATES}: s_obs
  and s_hid are RMS residuals on up to NOISE_IMAGES validation images (without p(x|z, m): one
  decoder error for all pixels)."""
  images = run.splits.validation[:NOISE_IMAGES]
  sums = loop.evaluate(jax.jit(functools.partial(residual_sums, config=run.config)), run.state,
                       images, run.config.train.batch_size, jax.random.fold_in(run.eval_key, 1))
  observed = float(np.sqrt(sums['observed'] / sums['observed_pixels']))
  hidden = (float(np.sqrt(sums['hidden'] / sums['hidden_pixels']))
            if methods.of(run.config).conditioned else observed)
  scales = {'observed': observed, 'hidden': hidden}
  return dict(scales, **calibrate(run, family, search, scales, functions), candidates=CANDIDATES)


def valid_noise(noise):
  """Whether `noise` (JSON content) is estimate_noise's: scales in [0, 1] (RMS errors of values
  in VALUE_RANGE), one [source, ess, ridge] among CANDIDATES and one predictive choice per
  CALIBRATION_FRACTIONS entry."""
  scale = lambda value: type(value) is float and 0.0 <= value <= 1.0   # NaN fails; bool is no float
  rows = noise.get('weighting')
  return (scale(noise.get('observed')) and scale(noise.get('hidden'))
          and noise.get('candidates') == CANDIDATES and isinstance(rows, list)
          and len(rows) == len(CALIBRATION_FRACTIONS)
          and all(isinstance(row, list) and len(row) == 3 and row[0] in SOURCES
                  and type(row[1]) is float and row[1] in ESS_TARGETS
                  and type(row[2]) is float and row[2] in RIDGES for row in rows)
          and isinstance(noise.get('predictive'), list)
          and len(noise['predictive']) == len(CALIBRATION_FRACTIONS)
          and all(map(predictive.valid, noise['predictive'])))


def noise_scales(workdir, run, family, search, made_from, functions=None):
  """estimate_noise of the run in `workdir`, cached in <workdir>/completion/noise.json; functions:
  where the completions' compiled functions are kept (a Completer's)."""
  return cached(pathlib.Path(workdir) / CACHE_DIR / 'noise.json',
                lambda: estimate_noise(run, family, search, {} if functions is None else functions),
                valid_noise, made_from)


def made_from(workdir, run):
  """What the completion/ cache of the run in `workdir` is computed from: the run's and the
  prior's checkpoints (fingerprint) and the settings of the calibration and the pool, as JSON."""
  workdir = pathlib.Path(workdir)
  prior_dir = MODELS[run.config.model].prior_dir
  return {'run': fingerprint(workdir),
          'prior': prior_dir and fingerprint(workdir / prior_dir),
          'settings': {'noise_images': NOISE_IMAGES, 'calibration_images': CALIBRATION_IMAGES,
                       'calibration_fractions': list(CALIBRATION_FRACTIONS),
                       'candidates': CANDIDATES, 'pool_size': POOL_SIZE,
                       'calibration_samples': CALIBRATION_SAMPLES,
                       'predictors': list(predictive.PREDICTORS), 'spreads': predictive.SPREADS,
                       'fixed_blends': predictive.FIXED_BLENDS,
                       'coverage_range': list(predictive.COVERAGE_RANGE),
                       'sampler': Settings()._asdict()}}
