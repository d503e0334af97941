"""Model registry: config.model names a builder of a flax module."""
import jax.numpy as jnp

from mtvae_jax import families
from mtvae_jax.models.gaussian import GaussianVAE
from mtvae_jax.models.vq import VQVAE


def _gaussian(config, image_shape):
  return GaussianVAE(image_shape=tuple(image_shape), method=config.method,
                     hidden_sizes=tuple(config.gaussian.hidden_sizes),
                     latent_dim=config.gaussian.latent_dim, conditioning=config.conditioning,
                     dtype=jnp.dtype(config.train.precision))


def _vq(config, image_shape):
  return VQVAE(image_shape=tuple(image_shape), method=config.method,
               hidden_sizes=tuple(config.vq.hidden_sizes),
               num_residual_layers=config.vq.num_residual_layers,
               num_embeddings=config.vq.num_embeddings,
               embedding_dim=config.vq.embedding_dim,
               commitment_cost=config.vq.commitment_cost, conditioning=config.conditioning,
               dtype=jnp.dtype(config.train.precision))


MODELS = {'gaussian': _gaussian, 'vq': _vq}
# The regularisation term each family adds to the reconstruction losses.
REGULARIZER = {name: family.regularizer for name, family in families.FAMILIES.items()}


def variables(state, params=None):
  """The flax variables {'params', 'batch_stats'} of a train state, with `params` in place of
  its own where given (the ones being differentiated)."""
  return {'params': state.params if params is None else params, 'batch_stats': state.batch_stats}


def build_model(config, image_shape):
  """The flax module for config.model and config.method on (H, W, C) images."""
  return MODELS[config.model](config, image_shape)
