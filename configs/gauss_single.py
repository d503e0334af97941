"""Gaussian VAE, method 'single'. Argument: '[<data set>][,<configuration number>]'."""
from mtvae_jax import config as config_lib


def get_config(arg=None):
  return config_lib.base_config('gaussian', 'single', arg)
