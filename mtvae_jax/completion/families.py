"""The model families the samplers draw latents of: Gaussian runs (MALA moves, the training
set's aggregate posterior as prior) and VQ runs (the PixelCNN, its pool of samples, code
Metropolis-Hastings moves); MODELS, by config.model.
"""
import functools
import pathlib
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtvae_jax import prior
from mtvae_jax.completion.cache import cached
from mtvae_jax.completion.settings import (ADAPTATION_RATE, CACHE_DIR, POOL_SIZE,
                                           TARGET_ACCEPTANCE, Family)


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
