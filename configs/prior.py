"""Gated PixelCNN prior over a trained VQ-VAE's codes (stage 2): python -m experiments.prior."""
from mtvae_jax import prior


def get_config():
  return prior.default_config()
