"""Gaussian VAE, method 'multi'. Argument: '[<data set>][,<configuration number>]'."""
from mtvae_jax import config as config_lib


def get_config(arg=None):
  return config_lib.base_config('gaussian', 'multi', arg)
