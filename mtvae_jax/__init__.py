"""Multitask variational autoencoders (Gaussian and VQ) in JAX/Flax."""
from mtvae_jax.errors import UserError
from mtvae_jax.train import train_and_evaluate

__all__ = ['UserError', 'train_and_evaluate']
