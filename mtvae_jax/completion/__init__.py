"""Completing images from a few observed pixels, with the uncertainty of the completion.

For an image x observed where the mask M is 1, with m = concat(M, M x), a run
has two views of an image given its latent z:

  g(z)     its generative decoder p(x | z) (decoder 1; method single: its decoder
           given m = 0), which says how well z explains pixels it was not shown;
  f(z, m)  the decoder that completes: the conditioned decoder (methods multi,
           single), which also takes in the observed pixels, or g (method none).

The latents come from

  prior:      z ~ p(z), ignoring what the observed pixels say about z;
  posterior:  z ~ p(z | x_obs) ∝ p(z) L(x_obs | z), by importance weighting of
              proposals, then resampling and (Settings.num_steps > 0) MCMC moves
              that leave the posterior invariant. The proposals are the latents of
              the Settings.neighbours training images closest to x on its observed
              pixels (the components of the training set's aggregate posterior that
              its observed pixels select):
                Gaussian runs: p(z) is that aggregate posterior (1/k) sum_j
                  q(z | x_j); the proposals are the components' means, the moves
                  MALA (Langevin proposals with a Metropolis test, the step size
                  tuned per image towards an acceptance rate of 0.574 in the first
                  half of the steps). The model prior N(0, I) is not used: with a
                  small KL weight it puts most of its mass where no training image
                  encodes, and a posterior under it fits the observed pixels with
                  images unlike any in the data.
                VQ runs: p(z) is the PixelCNN. The proposals add a pool of its
                  samples (completion/prior_codes.json) to the neighbours' codes,
                  weighted by p(z) / proposal share; the moves are single-site
                  Metropolis-Hastings in raster order, each code proposed from its
                  PixelCNN conditional given the codes before it.
              The likelihood L is exp(-e(z) / t), e the squared error on the
              observed pixels of either g(z) (source 'decoder'; f reproduces the
              observed pixels for almost any z, as they are its input, so it
              cannot tell which z explains them) or the neighbour image whose
              latent z is (source 'neighbours'). Source 'decoder_on_neighbours'
              scores by g but over the neighbours' latents alone, equally likely
              a priori (a VQ run's PixelCNN pool then plays no part; for a
              Gaussian run it is 'decoder'). Only source 'decoder' moves its
              samples; the others draw them from their neighbour's posterior.
              The temperature t, the unknown noise, is set per image so that
              the weights' effective sample size is a target. Each draw's
              completion is then moved by a regression adjustment: the
              weighted ridge regression, over the proposals, of f(z, m) on the
              observed pixels of the training image z is the latent of (g(z)'s
              where there is none), applied to the misfit there of the
              proposal the draw was resampled from (before its MCMC moves).
              The source, the target and the ridge are calibrated per observed
              fraction (CALIBRATION_FRACTIONS) on validation images, scattered
              and on grids, and an image takes those of the fraction nearest
              its own.

The prior method's samples are clip(f(z, m) + s eps, 0, 1) (the data's range),
s = s_obs and s_hid, root mean squared residuals of f given the encoder's z on
the observed and hidden pixels of validation images (completion/noise.json)
under the run's own mask distribution; its mean the average of f(z, m), its
std sqrt(var of f(z, m) + s^2). The posterior's samples at the observed pixels
are its draws f(z, m) + a (a the adjustment) with that noise, around the
posterior mean (weighted over all proposals, a lower-variance estimate than an
average of the resampled few); at the hidden pixels they come from a
predictive distribution calibrated on validation images per observed fraction
(predictive.py): a least-squares blend of the posterior mean with the nearest
neighbours' mean and smoothings of the observed pixels, where the model alone
would do worse, and structured spread (the draws' and the neighbours'
residuals, scaled), the blend and scales of the lowest CRPS whose 90 % interval
holds 80-97 % of the hidden values.

Everything per image is vmapped over images and jitted; images are completed
in chunks of one shape, so each setting compiles once.

The package's modules: settings (constants, the shared NamedTuples), families (the Gaussian and
VQ samplers, MODELS), cache (the completion/ files), posterior (an image's proposals and
completion), weighting (their weights and regression adjustment), predictive (the hidden pixels'
distribution), calibration (noise scales, weighting and predictive choices), inputs (checks and
sizes); io (the files of experiments.complete) and benchmark (experiments.sparse_benchmark).
This module loads a run and completes images.
"""
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from mtvae_jax import prior
from mtvae_jax import train
from mtvae_jax.completion.cache import cached
from mtvae_jax.completion.cache import digest
from mtvae_jax.completion.calibration import made_from
from mtvae_jax.completion.calibration import noise_scales
from mtvae_jax.completion.families import MODELS
from mtvae_jax.completion.families import component_draws
from mtvae_jax.completion.families import log_aggregate
from mtvae_jax.completion.families import mala
from mtvae_jax.completion.families import prior_pool
from mtvae_jax.completion.inputs import check_inputs
from mtvae_jax.completion.inputs import check_num_samples
from mtvae_jax.completion.inputs import chunk_size
from mtvae_jax.completion.inputs import progress_line
from mtvae_jax.completion.posterior import Proposals
from mtvae_jax.completion.posterior import completion_fn
from mtvae_jax.completion.posterior import nearest
from mtvae_jax.completion.posterior import nearest_rows
from mtvae_jax.completion.settings import CACHE_DIR
from mtvae_jax.completion.settings import CALIBRATION_FRACTIONS
from mtvae_jax.completion.settings import CANDIDATES
from mtvae_jax.completion.settings import Completer
from mtvae_jax.completion.settings import ESS_TARGETS
from mtvae_jax.completion.settings import METHODS
from mtvae_jax.completion.settings import RIDGES
from mtvae_jax.completion.settings import SEARCH_VALUES
from mtvae_jax.completion.settings import SOURCES
from mtvae_jax.completion.settings import Settings
from mtvae_jax.completion.weighting import effective_size
from mtvae_jax.completion.weighting import posterior_weights
from mtvae_jax.completion.weighting import regression_adjustment
from mtvae_jax.completion.weighting import temper
from mtvae_jax.completion.weighting import weighting_index
from mtvae_jax.errors import UserError

# The names other modules and the tests use as completion.<name>, wherever they are defined.
__all__ = ['CACHE_DIR', 'cached', 'CALIBRATION_FRACTIONS', 'CANDIDATES', 'check_inputs',
           'check_num_samples', 'chunk_size', 'complete', 'complete_arrays', 'Completer',
           'completer', 'component_draws', 'digest', 'effective_size', 'ESS_TARGETS', 'load_run',
           'log_aggregate', 'made_from', 'mala', 'METHODS', 'nearest', 'nearest_rows',
           'noise_scales', 'posterior_weights', 'prior_pool', 'Proposals',
           'regression_adjustment', 'RIDGES', 'Settings', 'SOURCES', 'temper', 'weighting_index']


def load_run(workdir):
  """The finished run in `workdir` (train.load_run), once its files are checked
  (prior.check_run): a folder that holds none is one UserError line, and nothing is created in
  it."""
  prior.check_run(workdir)
  return train.load_run(workdir)


def completer(workdir, run=None):
  """A Completer of the finished run in `workdir` (a VQ run needs its trained prior); its
  completion/ cache is computed again when damaged, or made from other checkpoints or settings."""
  run = run or load_run(workdir)
  sources = made_from(workdir, run)
  family = MODELS[run.config.model].family(workdir, run, sources)
  search = jnp.asarray(
      run.splits.train[:max(1, SEARCH_VALUES // math.prod(run.splits.train.shape[1:]))])
  functions = {}
  return Completer(run, family, noise_scales(workdir, run, family, search, sources, functions),
                   search, functions)


def complete_arrays(completer, x, mask, num_samples=32, method='posterior', seed=0,
                    settings=Settings(), progress=None):
  """Checked x (N, H, W, C) and mask (N, H, W, 1) -> {'mean', 'std', 'samples'} as numpy arrays.

  Image i's samples depend on (seed, i) only, not on how the images are chunked.
  progress: None, or called with a progress_line after each chunk but the last.
  """
  if method not in METHODS:
    raise UserError(f"method={method!r} is not allowed: use one of {', '.join(METHODS)}")
  check_num_samples(num_samples, len(x), x.shape[1:])
  fn = completion_fn(completer, method, num_samples, settings)
  size = chunk_size(len(x), num_samples, settings, completer.run.config.model)
  keys = jax.vmap(functools.partial(jax.random.fold_in, jax.random.key(seed)))(
      jnp.arange(len(x)))
  out, begun = [], time.perf_counter()
  for start in range(0, len(x), size):
    index = np.minimum(np.arange(start, start + size), len(x) - 1)  # padded with the last image
    out.append(jax.device_get(fn(keys[index], x[index], mask[index])))
    if progress and start + size < len(x):
      progress(progress_line(start + size, len(x), time.perf_counter() - begun))
  samples, mean, std = (np.concatenate(parts)[:len(x)] for parts in zip(*out))
  return {'mean': mean, 'std': std, 'samples': samples}


def complete(workdir, values, mask, num_samples=32, method='posterior', seed=0) -> dict:
  """Completes images of the finished run in `workdir` from their observed pixels.

  values: (N, H, W, C) or (H, W, C) in the run's range [0, 1]; NaN allowed where
  the mask is 0. mask: (N, H, W) or (H, W), 1 where observed. method:
  'posterior' or 'prior'. Returns {'mean': (N, H, W, C), 'std': (N, H, W, C),
  'samples': (N, num_samples, H, W, C)}, float32. Raises UserError for bad inputs.
  """
  run = load_run(workdir)
  x, mask = check_inputs(values, mask, run.splits.test.shape[1:])
  check_num_samples(num_samples, len(x), x.shape[1:])
  return complete_arrays(completer(workdir, run), x, mask, num_samples, method, seed)
