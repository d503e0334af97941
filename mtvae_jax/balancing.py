"""Loss balancing: fixed coefficients or SoftAdapt (Heydari et al., 2019, arXiv:1912.12355).

The training loss is sum_t w_t L_t over the method's terms ('recon',
'recon_cond' for multi, and 'kl' or 'vq'). With `loss.balancing='fixed'`,
w_t = loss.weights[t] (W1, W2, beta of thesis 3.2). With 'softadapt', every
`update_every` steps the weights of the balanced terms become

  s_t = Lbar_t(now) - Lbar_t(previous update)   (Lbar: mean of the last `window` steps)
  a_t = p_t exp(beta x_t) / sum_u p_u exp(beta x_u)   (SoftAdapt's shares, summing to 1)
  w_t = K c_t a_t   (scale='coefficients')   or   w_t = total a_t   (scale='total')

where (x, p) = (s, 1) for 'plain', (s / sum_u |s_u|, 1) for 'normalized' and
(s, Lbar) for 'loss_weighted', K is the number of balanced terms and c_t their
fixed coefficients loss.weights[t]. With 'coefficients' equal shares give back
the fixed weights, so the terms' units (a per-pixel mean against a per-image
sum) stay absorbed in c_t and SoftAdapt only shifts emphasis between them;
with 'total' the weights ignore c_t and the larger term's units dominate.
Until the first update the weights are those of equal shares. Terms outside
the balanced set keep their fixed weights. The state is a pytree updated
inside the jitted train step.
"""
import flax
import jax
import jax.numpy as jnp

from mtvae_jax import families
from mtvae_jax import methods


@flax.struct.dataclass
class State:
  """The weights in force and, for the K balanced terms, the recent losses.

  weights: {term: ()}; recent: (window, K) ring buffer of per-step losses;
  previous: (K,) their window means at the last update; count: () steps seen.
  """
  weights: dict
  recent: jax.Array
  previous: jax.Array
  count: jax.Array


def term_names(model, method):
  """The loss terms trained by `model` and `method`: the method's reconstruction terms and the
  model's regulariser."""
  return (*methods.METHODS[method].train, families.FAMILIES[model].regularizer)


def balanced_names(config):
  """The terms whose weights SoftAdapt sets (none for 'fixed'; () in the config means all)."""
  if config.loss.balancing == 'fixed':
    return ()
  return tuple(config.loss.softadapt.terms) or term_names(config.model, config.method)


def _coefficients_scale(config, names):
  return jnp.asarray([len(names) * config.loss.weights[name] for name in names], jnp.float32)


def _total_scale(config, names):
  return jnp.full(len(names), config.loss.softadapt.total, jnp.float32)


# scale -> (config, balanced names) -> (K,) factors that turn SoftAdapt's shares into weights
SCALES = {'coefficients': _coefficients_scale, 'total': _total_scale}


def scale(config, names):
  """(K,) factors f with w_t = f_t a_t for SoftAdapt's shares a_t."""
  return SCALES[config.loss.softadapt.scale](config, names)


def init(config):
  """Fixed weights, or those of equal shares on the K balanced terms, and an empty history."""
  names = balanced_names(config)
  softadapt = config.loss.softadapt
  weights = {name: jnp.asarray(config.loss.weights[name], jnp.float32)
             for name in term_names(config.model, config.method)}
  if names:
    weights.update(zip(names, scale(config, names) / len(names)))
  return State(weights=weights, recent=jnp.zeros((softadapt.window, len(names))),
               previous=jnp.zeros(len(names)), count=jnp.zeros((), jnp.int32))


def _plain(slopes, means):
  return slopes, jnp.ones_like(means)


def _normalized(slopes, means):
  scale = jnp.maximum(jnp.sum(jnp.abs(slopes)), jnp.finfo(slopes.dtype).tiny)  # all-zero slopes
  return slopes / scale, jnp.ones_like(means)


def _loss_weighted(slopes, means):
  return slopes, means


# variant -> (slopes, window means) -> (softmax inputs x, numerator factors p)
VARIANTS = {'plain': _plain, 'normalized': _normalized, 'loss_weighted': _loss_weighted}


def softadapt_shares(slopes, means, *, variant, beta):
  """(K,) positive shares summing to 1 from the (K,) slopes and window means."""
  x, p = VARIANTS[variant](slopes, means)
  logits = beta * x
  numerators = p * jnp.exp(logits - jnp.max(logits))
  return numerators / jnp.sum(numerators)


def _fixed_update(state, losses, config):
  del losses, config
  return state


def _softadapt_update(state, losses, config):
  softadapt = config.loss.softadapt
  names = balanced_names(config)
  window, every = softadapt.window, softadapt.update_every
  count = state.count + 1
  recent = state.recent.at[state.count % window].set(jnp.stack([losses[name] for name in names]))
  means = jnp.mean(recent, axis=0)
  due = (count % every == 0) & (count >= window)  # a full window: record its mean
  ready = due & (count >= window + every)  # ... and one recorded at the previous update
  new = scale(config, names) * softadapt_shares(means - state.previous, means,
                                                variant=softadapt.variant, beta=softadapt.beta)
  weights = dict(state.weights, **{name: jnp.where(ready, new[i], state.weights[name])
                                   for i, name in enumerate(names)})
  return State(weights=weights, recent=recent, previous=jnp.where(due, means, state.previous),
               count=count)


UPDATES = {'fixed': _fixed_update, 'softadapt': _softadapt_update}


def update(state, losses, config):
  """The state after a step whose batch losses are `losses` {term: ()}."""
  return UPDATES[config.loss.balancing](state, losses, config)
