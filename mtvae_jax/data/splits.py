"""Train / validation / test splits, deterministic by seed."""
from typing import NamedTuple

import numpy as np

from mtvae_jax.errors import UserError


class Splits(NamedTuple):
  """float32 arrays (N, H, W, C) with values in [0, 1]."""
  train: np.ndarray
  validation: np.ndarray
  test: np.ndarray


def take_fraction(images, fraction, seed, what):
  """Shuffle by seed and cut off `fraction` of the rows: (rest, cut)."""
  if not 0.0 < fraction < 1.0:
    raise UserError(f'data.{what}_fraction={fraction} is not allowed: use a value in (0, 1)')
  order = np.random.default_rng(seed).permutation(len(images))
  size = max(1, int(round(fraction * len(images))))
  return images[np.sort(order[size:])], images[np.sort(order[:size])]


def split(train_images, test_images, data_config, seed):
  """Splits from a train set (validation cut off it) and a test set or None (cut off too)."""
  if test_images is None:
    train_images, test_images = take_fraction(
        train_images, data_config.test_fraction, seed, 'test')
  train, validation = take_fraction(
      train_images, data_config.validation_fraction, seed + 1, 'validation')
  return Splits(train, validation, test_images)
