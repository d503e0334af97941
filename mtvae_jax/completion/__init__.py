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
              proposals, then resampling and MCMC moves that leave the posterior
              invariant. The proposals are the latents of the Settings.neighbours
              training images closest to x on its observed pixels (the components
              of the training set's aggregate posterior that its observed pixels
              select):
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
              fraction (CALIBRATION_FRACTIONS) on validation images, and an
              image takes those of the fraction nearest its own.

Predictive samples are clip(f(z, m) + a + s eps, 0, 1) (the data's range), a the adjustment
(0 for the prior method), with s
= s_obs and s_hid, root mean squared residuals of f given the encoder's z on
the observed and hidden pixels of validation images (completion/noise.json)
under the run's own mask distribution. The prior method's mean is the average of
f(z, m) over its samples; the posterior's mean is weighted over all proposals,
a lower-variance estimate than an average of the resampled few. The std is
sqrt(var of f(z, m) + a over the samples + s^2).

Everything per image is vmapped over images and jitted; images are completed
in chunks of one shape, so each setting compiles once.

The package's other modules: io (the files of experiments.complete) and
benchmark (experiments.sparse_benchmark).
"""
import functools
import hashlib
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtvae_jax import loop
from mtvae_jax import masks
from mtvae_jax import methods
from mtvae_jax import prior
from mtvae_jax import train
from mtvae_jax import workdir as workdir_lib
from mtvae_jax.errors import UserError

METHODS = ('posterior', 'prior')
VALUE_RANGE = (0.0, 1.0)    # the data loaders' range, and the decoders' (a sigmoid)
CACHE_DIR = 'completion'
NOISE_IMAGES = 2048          # validation images behind the noise scales
CALIBRATION_IMAGES = 128     # validation images behind each weighting choice
CALIBRATION_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.25, 0.5)   # observed fractions calibrated
SOURCES = ('decoder', 'neighbours', 'decoder_on_neighbours')   # what scores a proposal's fit
ESS_TARGETS = (4.0, 8.0, 16.0, 32.0, 64.0, 128.0)  # candidate effective sample sizes of the weights
POOL_SIZE = 1024             # PixelCNN prior samples of a VQ run, drawn once
SEARCH_VALUES = 2 ** 26      # at most this many pixel values of training images are searched
TARGET_ACCEPTANCE = 0.574    # MALA's optimal acceptance rate (Roberts and Rosenthal, 1998)
ADAPTATION_RATE = 2.0        # change of log step size per step, per unit of acceptance error
TEMPERATURE_RANGE = (-20.0, 20.0)   # log temperatures searched by `temper`
TEMPERATURE_STEPS = 48       # bisection steps of `temper`
RIDGES = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 1.0)   # candidate ridge penalties of regression_adjustment
ADJUSTMENT_STEPS = 64        # conjugate-gradient steps of regression_adjustment
CANDIDATES = [list(SOURCES), list(ESS_TARGETS), list(RIDGES)]   # noise.json's record of them
# Pixel values of one image's samples decoded at once: 2**20 took about 2.5 GB (8x8 digits).
MAX_SAMPLE_VALUES = 2 ** 20
MEMORY_SHARE = 4   # the samples of all images may take a quarter of the machine's memory


class Settings(NamedTuple):
  """Sampler sizes: the training images closest on the observed pixels, whose latents are the
  proposals (VQ: besides the PixelCNN pool); prior draws as proposals where neighbours is 0 (the
  model's own prior alone; a VQ run uses its pool); MCMC steps of the samples."""
  num_proposals: int = 256
  num_steps: int = 4
  neighbours: int = 256


class Family(NamedTuple):
  """What the samplers need of a model family; `data` holds its arrays (jit arguments).

  decode(variables, z (n, ...), m (n, H, W, 1 + C) or None) -> (n, H, W, C), None: g(z);
  prior(data, key, n) -> z (n, ...) from the model's prior;
  guided(variables, data, near (k, H, W, C)) -> proposals z (n, ...), log p(z) - log q(z) (n,)
    for their density q, `local`, what start and refine need of the prior given `near`, and
    `own` (n,), the row of `near` whose latent each proposal is (-1: none);
  start(local, key, z, own) -> z: the resampled proposals turned into draws of their
    neighbour's posterior (Gaussian: around its mean; VQ: its codes as they are);
  refine(data, local, key, z, log_likelihood, num_steps) -> z, MCMC moves targeting
    p(z) exp(log_likelihood(z)) (local None: the model's prior).
  """
  decode: Callable
  prior: Callable
  guided: Callable
  start: Callable
  refine: Callable
  data: Any


class Completer(NamedTuple):
  """A loaded run, ready to complete images: see `completer`."""
  run: train.Run
  family: Family
  noise: dict      # {'observed': s_obs, 'hidden': s_hid, 'weighting': [[source, ess, ridge]]
                   # per CALIBRATION_FRACTIONS entry, 'candidates': CANDIDATES, 'made_from':
                   # made_from's record}
  search: Any      # (N, H, W, C) training images searched for the nearest ones
  functions: dict  # completion_fn's jitted functions, by (method, num_samples, settings)


# Gaussian runs.

def _decode(module, z, m):
  return module.decode(z, m)


def mala(key, z, log_target, num_steps, step_size=1e-2):
  """num_steps MALA steps of the chains z (S, d) targeting exp(log_target), (S, d) -> (S,).

  Proposal z' = z + e grad + sqrt(2 e) xi, accepted with the Metropolis-Hastings
  probability; log e moves by ADAPTATION_RATE * (acceptance - TARGET_ACCEPTANCE)
  (averaged over the chains) in the first half of the steps and is then fixed.
  """
  def summed(z):
    values = log_target(z)
    return jnp.sum(values), values

  grad_fn = jax.grad(summed, has_aux=True)  # z -> (each chain's gradient, log_target(z))

  def log_q(to, start, grad, eps):
    return -jnp.sum(jnp.square(to - start - eps * grad), axis=-1) / (4.0 * eps)

  def step(carry, inputs):
    z, value, grad, log_eps = carry
    index, key = inputs
    eps = jnp.exp(log_eps)
    noise_key, accept_key = jax.random.split(key)
    proposal = z + eps * grad + jnp.sqrt(2.0 * eps) * jax.random.normal(noise_key, z.shape)
    proposal_grad, proposal_value = grad_fn(proposal)
    log_alpha = (proposal_value + log_q(z, proposal, proposal_grad, eps)
                 - value - log_q(proposal, z, grad, eps))
    log_alpha = jnp.nan_to_num(log_alpha, nan=-jnp.inf)
    accept = jnp.log(jax.random.uniform(accept_key, value.shape)) < log_alpha
    rate = jnp.mean(jnp.exp(jnp.minimum(log_alpha, 0.0)))
    log_eps = jnp.where(index < num_steps // 2,
                        log_eps + ADAPTATION_RATE * (rate - TARGET_ACCEPTANCE), log_eps)
    pick = lambda new, old: jnp.where(accept.reshape(-1, *[1] * (new.ndim - 1)), new, old)
    return (pick(proposal, z), pick(proposal_value, value), pick(proposal_grad, grad),
            log_eps), None

  grad, value = grad_fn(z)
  carry = (z, value, grad, jnp.log(step_size))
  (z, *_), _ = jax.lax.scan(step, carry, (jnp.arange(num_steps), jax.random.split(key, num_steps)))
  return z


def _log_normal(z, mean, log_var):
  """log N(z; mean, diag exp(log_var)) over the last axis, without the 2 pi term."""
  return -0.5 * jnp.sum(jnp.square(z - mean) * jnp.exp(-log_var) + log_var, axis=-1)


def component_draws(key, means, log_vars, own):
  """Draws (n, d) from N(means_j, diag exp(log_vars_j)), (k, d) each, for the components j = own
  (n,): with own uniform, draws from their mixture (1/k) sum_j N(means_j, ...)."""
  return means[own] + jnp.exp(0.5 * log_vars[own]) * jax.random.normal(key, (len(own), means.shape[1]))


def log_aggregate(means, log_vars, z):
  """log of that mixture's density at z (S, d), without the 2 pi term, -> (S,)."""
  return jax.nn.logsumexp(_log_normal(z[:, None], means, log_vars), axis=1) - jnp.log(len(means))


def gaussian_family(run):
  latent_dim = run.config.gaussian.latent_dim

  def guided(variables, data, near):
    """The posterior means of `near`, the components of the prior here: weights 0."""
    del data
    local = run.model.apply(variables, near, method='posterior')   # means, log_vars (k, d)
    return local[0], jnp.zeros(len(near)), local, jnp.arange(len(near))

  def start(local, key, z, own):
    return z if local is None else component_draws(key, *local, own)

  def refine(data, local, key, z, log_likelihood, num_steps):
    del data
    log_prior = (lambda z: _log_normal(z, 0.0, 0.0)) if local is None else functools.partial(
        log_aggregate, *local)
    return mala(key, z, lambda z: log_likelihood(z) + log_prior(z), num_steps)

  return Family(
      decode=lambda variables, z, m: run.model.apply(variables, z, m, method=_decode),
      prior=lambda data, key, n: jax.random.normal(key, (n, latent_dim)),
      guided=guided, start=start, refine=refine, data=None)


# VQ runs.

def _decode_codes(module, codes, m):
  return module.decode(module.lookup(codes), m)


def code_log_probs(logits, codes):
  """Logits (S, h, w, K) and codes (S, h, w) -> (S, h, w) log p(c_i | codes before i)."""
  log_p = jax.nn.log_softmax(logits)
  return jnp.take_along_axis(log_p, codes[..., None], axis=-1)[..., 0]


def code_mh(key, codes, logits_fn, log_likelihood, num_steps):
  """num_steps single-site Metropolis-Hastings moves of the chains `codes` (S, h, w).

  Target: p(c) exp(log_likelihood(c)), p the PixelCNN (`logits_fn`: codes ->
  (S, h, w, K) logits of each code given those before it). Step t revisits
  position t mod (h w) in raster order and proposes its code from p(c_i | c_<i),
  which the move leaves unchanged; the prior's ratio then reduces to the
  conditionals of the later codes.
  """
  _, height, width = codes.shape

  def step(carry, inputs):
    codes, logits, log_prior, log_lik = carry
    index, key = inputs
    row, col = (index // width) % height, index % width
    propose_key, accept_key = jax.random.split(key)
    here = logits[:, row, col]
    new = jax.random.categorical(propose_key, here).astype(codes.dtype)
    proposal = codes.at[:, row, col].set(new)
    proposal_logits = logits_fn(proposal)
    proposal_log_prior = jnp.sum(code_log_probs(proposal_logits, proposal), axis=(1, 2))
    proposal_log_lik = log_likelihood(proposal)
    log_q = jax.nn.log_softmax(here)
    pick_q = lambda c: jnp.take_along_axis(log_q, c[:, None], axis=-1)[:, 0]
    log_alpha = (proposal_log_prior - log_prior - pick_q(new) + pick_q(codes[:, row, col])
                 + proposal_log_lik - log_lik)
    accept = jnp.log(jax.random.uniform(accept_key, log_lik.shape)) < log_alpha
    pick = lambda a, b: jnp.where(accept.reshape(-1, *[1] * (a.ndim - 1)), a, b)
    return (pick(proposal, codes), pick(proposal_logits, logits),
            pick(proposal_log_prior, log_prior), pick(proposal_log_lik, log_lik)), None

  logits = logits_fn(codes)
  carry = (codes, logits, jnp.sum(code_log_probs(logits, codes), axis=(1, 2)),
           log_likelihood(codes))
  (codes, *_), _ = jax.lax.scan(step, carry,
                                (jnp.arange(num_steps), jax.random.split(key, num_steps)))
  return codes


def vq_family(run, prior_model, prior_params, pool):
  def logits_fn(params, codes):
    return prior_model.apply({'params': params}, codes)

  def log_prior(params, codes):
    return jnp.sum(code_log_probs(logits_fn(params, codes), codes), axis=(1, 2))

  def guided(variables, data, near):
    """The pool (prior draws) and the k codes of `near`, standing for as many draws spread evenly
    over them as the pool holds: log p - log q with q = (p + neighbours' share) / 2, plus
    log(n / k) for theirs."""
    pool, k = data['pool'], len(near)
    n = len(pool)
    codes = jnp.concatenate([pool, run.model.apply(variables, near, method='codes')])
    copies = jnp.sum(jnp.all(codes[:, None] == codes[None, -k:], axis=(2, 3)), axis=1)  # (n + k,)
    log_p = jnp.concatenate([data['pool_log_prior'], log_prior(data['prior_params'], codes[-k:])])
    log_q = jnp.logaddexp(log_p, jnp.log(copies / k))
    weight = jnp.where(jnp.arange(len(codes)) < n, 0.0, jnp.log(n / k))
    own = jnp.concatenate([jnp.full(n, -1), jnp.arange(k)])
    return codes, log_p - log_q + weight, None, own

  def refine(data, local, key, codes, log_likelihood, num_steps):
    del local
    return code_mh(key, codes, functools.partial(logits_fn, data['prior_params']), log_likelihood,
                   num_steps)

  def draw(data, key, n):
    pool = data['pool']
    if n == len(pool):
      return pool
    return pool[jax.random.choice(key, len(pool), (n,), replace=False)]

  return Family(
      decode=lambda variables, codes, m: run.model.apply(variables, codes, m, method=_decode_codes),
      prior=draw, guided=guided, start=lambda local, key, codes, own: codes, refine=refine,
      data={'prior_params': prior_params, 'pool': pool,
            'pool_log_prior': jax.jit(log_prior)(prior_params, pool)})


def valid_codes(value, shape, num_codes):
  """Whether value['codes'] (JSON content) is an integer grid of `shape` of codes below
  num_codes."""
  try:
    codes = np.asarray(value.get('codes'))
  except ValueError:   # ragged lists
    return False
  return (codes.dtype.kind == 'i' and codes.shape == shape and codes.size > 0
          and 0 <= codes.min() and codes.max() < num_codes
          and all(type(code) is int for code in np.asarray(value['codes'], object).flat))  # no bool


def prior_pool(workdir, run, prior_model, prior_params, sources, size=POOL_SIZE, seed=0):
  """(size, h, w) int32 codes drawn from the PixelCNN prior, cached in
  <workdir>/completion/prior_codes.json with what they were drawn from (`sources`)."""
  grid = prior.code_grid(run)

  def draw():
    sample = prior.sampler(prior_model)
    keys = jax.random.split(jax.random.key(seed), -(-size // 256))
    pool = np.concatenate([np.asarray(sample(prior_params, key, (256, *grid))) for key in keys])
    return {'codes': pool[:size].tolist()}

  value = cached(pathlib.Path(workdir) / CACHE_DIR / 'prior_codes.json', draw,
                 lambda value: valid_codes(value, (size, *grid), run.config.vq.num_embeddings),
                 sources)
  return np.asarray(value['codes'], np.int32)


def _load_vq(workdir, run, sources):
  """The vq_family of the run in `workdir`, with its trained prior and its pool."""
  prior_model, prior_state = prior.load_prior(workdir, run)
  pool = prior_pool(workdir, run, prior_model, prior_state.params, sources)
  return vq_family(run, prior_model, prior_state.params, jnp.asarray(pool))


class Model(NamedTuple):
  """What the completion of a config.model needs: family(workdir, run, made_from) -> its Family;
  prior_dir, the folder in the run of a trained prior its Family draws from (None: none); pool,
  the prior draws among every image's proposals."""
  family: Callable
  prior_dir: Any
  pool: int


MODELS = {'gaussian': Model(lambda workdir, run, sources: gaussian_family(run), None, 0),
          'vq': Model(_load_vq, prior.PRIOR_DIR, POOL_SIZE)}


def digest(value):
  """SHA-256 (hex) of the JSON object `value`, its keys sorted: a cache file's own sum."""
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def cached(path, compute, valid, sources):
  """The JSON object in `path` where it matches its 'sha256' (digest), was made from `sources`
  and valid(it); else compute() with 'made_from': sources, written there with its sum (unless
  the folder is read-only). A file that is there but stale or damaged is named on stderr as it
  is replaced."""
  try:
    value = workdir_lib.read_json(path)
    if (isinstance(value, dict) and value.pop('sha256', None) == digest(value)
        and value.get('made_from') == sources and valid(value)):
      return value
    reason = 'made from another checkpoint, prior or settings, or damaged'
  except UserError:
    reason = 'damaged'
  except OSError:   # absent
    reason = None
  if reason:
    print(f"'{path}' is {reason}: computing it again", file=sys.stderr, flush=True)
  value = dict(compute(), made_from=sources)
  try:
    path.parent.mkdir(exist_ok=True)
    workdir_lib.write_json(path, dict(value, sha256=digest(value)))
  except OSError:
    pass
  return value


# Both families.

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


# Noise scales.

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
  proposals = posterior_proposals(key, x, mask, variables, data, search, family=family,
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


def calibrate_weighting(run, family, search, settings=Settings()):
  """[[source, ess, ridge] per CALIBRATION_FRACTIONS entry]: the SOURCES, ESS_TARGETS and
  RIDGES entries whose posterior mean has the lowest hidden-pixel error on CALIBRATION_IMAGES
  validation images observed at that fraction of their pixels, drawn uniformly at random
  (scattered, as a user's sensors are).

  Which source scores proposals better depends on how many pixels are observed:
  with a few, g's own reconstruction error at them outweighs the differences
  between the neighbours, whose own pixels then rank them better.
  """
  images = jnp.asarray(run.splits.validation[:CALIBRATION_IMAGES])
  variables = {'params': run.state.params, 'batch_stats': run.state.batch_stats}
  fn = jax.jit(jax.vmap(functools.partial(calibration_errors, run=run, family=family,
                                          settings=settings),
                        in_axes=(0, 0, 0, None, None, None)))
  size = chunk_size(len(images), 1, settings, run.config.model)
  pixels = math.prod(images.shape[1:3])
  weighting = []
  for index, fraction in enumerate(CALIBRATION_FRACTIONS):
    count = max(1, round(fraction * pixels))
    mask_key, key = jax.random.split(jax.random.fold_in(run.eval_key, 2 + index))
    mask = jax.vmap(lambda key: masks.uniform_mask(key, count, images.shape[1:3]))(
        jax.random.split(mask_key, len(images)))
    keys = jax.random.split(key, len(images))
    errors = sum(np.sum(np.asarray(fn(keys[start:start + size], images[start:start + size],
                                      mask[start:start + size], variables, family.data, search)),
                        axis=0)
                 for start in range(0, len(images) - size + 1, size))  # whole chunks: one shape
    source, ess, ridge = np.unravel_index(np.argmin(errors), errors.shape)
    weighting.append([SOURCES[source], ESS_TARGETS[ess], RIDGES[ridge]])
  return weighting


def estimate_noise(run, family, search):
  """{'observed': s_obs, 'hidden': s_hid, 'weighting': calibrate_weighting's choices,
  'candidates': CANDIDATES, what it chose from}: s_obs and s_hid are RMS residuals on up to
  NOISE_IMAGES validation images (without p(x|z, m): one decoder error for all pixels)."""
  images = run.splits.validation[:NOISE_IMAGES]
  sums = loop.evaluate(jax.jit(functools.partial(residual_sums, config=run.config)), run.state,
                       images, run.config.train.batch_size, jax.random.fold_in(run.eval_key, 1))
  observed = float(np.sqrt(sums['observed'] / sums['observed_pixels']))
  hidden = (float(np.sqrt(sums['hidden'] / sums['hidden_pixels']))
            if methods.of(run.config).conditioned else observed)
  return {'observed': observed, 'hidden': hidden,
          'weighting': calibrate_weighting(run, family, search),
          'candidates': CANDIDATES}


def valid_noise(noise):
  """Whether `noise` (JSON content) is estimate_noise's: scales in [0, 1] (RMS errors of values
  in VALUE_RANGE), one [source, ess, ridge] among CANDIDATES per CALIBRATION_FRACTIONS entry."""
  scale = lambda value: type(value) is float and 0.0 <= value <= 1.0   # NaN fails; bool is no float
  rows = noise.get('weighting')
  return (scale(noise.get('observed')) and scale(noise.get('hidden'))
          and noise.get('candidates') == CANDIDATES and isinstance(rows, list)
          and len(rows) == len(CALIBRATION_FRACTIONS)
          and all(isinstance(row, list) and len(row) == 3 and row[0] in SOURCES
                  and type(row[1]) is float and row[1] in ESS_TARGETS
                  and type(row[2]) is float and row[2] in RIDGES for row in rows))


def noise_scales(workdir, run, family, search, made_from):
  """estimate_noise of the run in `workdir`, cached in <workdir>/completion/noise.json."""
  return cached(pathlib.Path(workdir) / CACHE_DIR / 'noise.json',
                lambda: estimate_noise(run, family, search), valid_noise, made_from)


def fingerprint(folder):
  """SHA-256 (hex) of the files of the best checkpoint under `folder` (a run's or a prior's)."""
  best = pathlib.Path(folder) / 'checkpoints' / 'best'
  digest = hashlib.sha256()
  for path in sorted(best.rglob('*')):
    if path.is_file():
      digest.update(str(path.relative_to(best)).encode() + b'\0' + path.read_bytes())
  return digest.hexdigest()


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
                       'sampler': Settings()._asdict()}}


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
  return Completer(run, family, noise_scales(workdir, run, family, search, sources), search, {})


# Checked inputs.

def check_inputs(values, mask, image_shape):
  """values (N, H, W, C) or (H, W, C), mask (N, H, W) or (H, W) -> float32 x (N, H, W, C) with
  0 at hidden pixels, and mask (N, H, W, 1) of 0/1. Raises UserError naming what does not fit."""
  height, width, channels = image_shape
  values, mask = np.asarray(values), np.asarray(mask)
  for name, array in (('values', values), ('mask', mask)):
    if array.dtype.kind not in 'biuf':
      raise UserError(f'{name} of dtype {array.dtype} are not numbers: use an array of floats '
                      '(or integers, booleans)')
  if values.ndim == 3:
    values = values[None]
  if values.ndim != 4 or values.shape[1:] != (height, width, channels):
    raise UserError(f'values of shape {values.shape} do not fit the run: use (N, {height}, '
                    f'{width}, {channels}) or ({height}, {width}, {channels})')
  if not len(values):
    raise UserError(f'values of shape {values.shape} hold no image: give at least one')
  if mask.shape not in ((height, width), values.shape[:3]):
    raise UserError(f'mask of shape {mask.shape} does not fit values of shape {values.shape}: '
                    f'use ({height}, {width}) or ({len(values)}, {height}, {width})')
  mask = np.broadcast_to(mask, values.shape[:3])
  if not np.all((mask == 0) | (mask == 1)):
    raise UserError('mask holds values other than 0 and 1 (or False and True): use 1 where a '
                    'pixel is observed, 0 elsewhere')
  empty = np.flatnonzero(mask.sum(axis=(1, 2)) == 0)
  if len(empty):
    raise UserError(f'mask of image {empty[0]} observes no pixel: observe at least one')
  observed = np.broadcast_to(mask[..., None] == 1, values.shape)
  seen = values[observed]
  low, high = VALUE_RANGE
  if not np.all(np.isfinite(seen)) or seen.min() < low or seen.max() > high:
    bad = seen[~(np.isfinite(seen) & (seen >= low) & (seen <= high))][0]
    raise UserError(f'observed value {bad} is outside the run\'s range: use values in '
                    f'[{low}, {high}] at observed pixels (NaN only at hidden ones)')
  x = np.where(observed, values, 0.0).astype(np.float32)
  return x, mask[..., None].astype(np.float32)


def chunk_size(num_images, num_samples, settings, model):
  """Images per jitted call: all, or as many as keep about 4096 latents decoded at once."""
  proposals = MODELS[model].pool + (settings.neighbours or settings.num_proposals)
  return min(num_images, max(1, 4096 // max(num_samples, proposals)))


def memory_bytes():
  """The machine's physical memory in bytes."""
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def check_num_samples(num_samples, num_images, image_shape):
  """UserError, before anything is allocated, unless num_samples completions of num_images
  images of (H, W, C) image_shape fit: each image's samples are decoded at once (at most
  MAX_SAMPLE_VALUES pixel values), all images' are kept (at most 1 / MEMORY_SHARE of the
  machine's memory)."""
  values = math.prod(image_shape)
  most = max(2, MAX_SAMPLE_VALUES // values)
  shape = 'x'.join(map(str, image_shape))
  if not 2 <= num_samples <= most:
    raise UserError(f'num_samples={num_samples} is not allowed: use an integer from 2 to {most} '
                    f'(the most whose completions of one {shape} image fit in memory at once)')
  budget = memory_bytes() // MEMORY_SHARE
  needed = 4 * num_images * num_samples * values   # float32 samples
  if needed > budget:
    fits = max(0, budget // (4 * num_images * values))
    raise UserError(f'num_samples={num_samples} of {num_images} {shape} images would take '
                    f'{needed / 2**30:.1f} GiB, over 1/{MEMORY_SHARE} of this machine\'s '
                    f'{memory_bytes() / 2**30:.0f} GiB: use num_samples <= {fits}, or complete '
                    'fewer images at a time')


def progress_line(done, total, seconds):
  """'completed done/total images, about T s left' at the pace so far."""
  return f'completed {done}/{total} images, about {seconds / done * (total - done):.0f} s left'


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
