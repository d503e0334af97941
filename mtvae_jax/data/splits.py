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


def subset(images, size, seed):
  """`size` of `images` drawn by seed, in their order; all of them when there are no more."""
  if size >= len(images):
    return images
  return images[np.sort(np.random.default_rng(seed).permutation(len(images))[:size])]


def fold(images, num_folds, index, seed):
  """Fold `index` of `num_folds` as validation, the other folds as training: (train, validation).

  Folds are disjoint, cover `images`, differ in size by at most one, and are
  fixed by `seed` (the same for every index).
  """
  if num_folds < 2 or num_folds > len(images):
    raise UserError(f'data.num_folds={num_folds} is not allowed: use 0 (no folds) or 2 to '
                    f'{len(images)}')
  if not 0 <= index < num_folds:
    raise UserError(f'data.fold={index} is not allowed: use 0 to {num_folds - 1}')
  order = np.random.default_rng(seed).permutation(len(images))
  held_out = np.array_split(order, num_folds)[index]
  keep = np.ones(len(images), bool)
  keep[held_out] = False
  return images[keep], images[np.sort(held_out)]


def split(train_images, test_images, data_config, seed):
  """Splits from a train set and a test set or None (then cut off the train set).

  Validation is data.validation_fraction of the rest, or with data.num_folds
  >= 2 fold data.fold of it (k-fold cross-validation); the test split is the
  same for every fold. With data.max_images, a subset of that many images is
  drawn first, official train and test sets in their proportions. UserError
  when a split would be empty.
  """
  if data_config.max_images:
    num_train = data_config.max_images
    if test_images is not None:
      share = len(train_images) / (len(train_images) + len(test_images))
      num_train = int(round(share * data_config.max_images))
      test_images = subset(test_images, data_config.max_images - num_train, seed + 3)
    train_images = subset(train_images, num_train, seed + 2)
  if test_images is None:
    train_images, test_images = take_fraction(
        train_images, data_config.test_fraction, seed, 'test')
  total = len(train_images) + len(test_images)
  if data_config.num_folds:
    train, validation = fold(train_images, data_config.num_folds, data_config.fold, seed + 1)
  else:
    train, validation = take_fraction(
        train_images, data_config.validation_fraction, seed + 1, 'validation')
  splits = Splits(train, validation, test_images)
  where = f" in data.path='{data_config.path}'" if data_config.path else ''
  for name, images in splits._asdict().items():
    if not len(images):
      raise UserError(
          f'data set {data_config.name}{where} gives no {name} image ({total} images in all, '
          f'data.test_fraction={data_config.test_fraction}, data.validation_fraction='
          f'{data_config.validation_fraction}, data.max_images={data_config.max_images}): use at '
          'least 3 images, one per split, or smaller fractions')
  return splits
