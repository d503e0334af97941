"""Multitask variational autoencoders (Gaussian and VQ) in JAX/Flax.

Importing the package sets nothing global: the command lines configure JAX
themselves (experiments/cli.py).
"""
from mtvae_jax.completion import complete
from mtvae_jax.errors import UserError
from mtvae_jax.train import train_and_evaluate

__all__ = ['UserError', 'complete', 'train_and_evaluate']
