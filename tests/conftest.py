"""Shared fixtures: small networks on the embedded digits so every test compiles little."""
import pytest

from mtvae_jax import config as config_lib

VARIANTS = [(model, method) for model in ('gaussian', 'vq') for method in ('none', 'multi', 'single')]


def small_config(model, method, num_epochs=2):
  """A thesis config with narrow layers, for tests: same code paths, little compute."""
  config = config_lib.base_config(model, method, 'digits')
  config.gaussian.hidden_sizes = (8, 16)
  config.gaussian.latent_dim = 4
  config.vq.hidden_sizes = (8, 16)
  config.vq.num_residual_layers = 1
  config.vq.num_embeddings = 16
  config.vq.embedding_dim = 4
  config.train.num_epochs = num_epochs
  config.train.batch_size = 64
  return config


@pytest.fixture
def make_config():
  return small_config
