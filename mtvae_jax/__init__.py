"""Multitask variational autoencoders (Gaussian and VQ) in JAX/Flax.

Importing the package sets nothing global: the command lines configure JAX
themselves (experiments/cli.py). `complete` and `train_and_evaluate` are
imported on first use, so that a light module (config, methods, families)
loads without the flax models.
"""
import importlib

from mtvae_jax.errors import UserError

# The package's functions, by the module that defines each.
_FUNCTIONS = {'complete': 'mtvae_jax.completion', 'train_and_evaluate': 'mtvae_jax.train'}

__all__ = ['UserError', 'complete', 'train_and_evaluate']


def __getattr__(name):
  if name not in _FUNCTIONS:
    raise AttributeError(f"module 'mtvae_jax' has no attribute '{name}'")
  return getattr(importlib.import_module(_FUNCTIONS[name]), name)
