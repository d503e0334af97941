"""Checking a user's inputs before anything is computed, and sizing the work: the images per
jitted call, the samples that fit in memory, the progress line.
"""
import math
import os

import numpy as np

from mtvae_jax.completion.families import MODELS
from mtvae_jax.completion.settings import MAX_SAMPLE_VALUES, MEMORY_SHARE, VALUE_RANGE
from mtvae_jax.errors import UserError


def check_inputs(values, mask, image_shape):
  """values (N, H, W, C) or (H, W, C), mask (N, H, W) or (H, W) -> float32 x (N, H, W, C) with
  0 at hidden pixels, and mask (N, H, W, 1) of 0/1. Raises UserError naming what does not fit."""
  height, width, channels = image_shape
  values, mask = np.asarray(values), np.asarray(mask)
  for name, array in (('values', values), ('mask', mask)):
    if array.dtype.kind not in 'biuf':
      raise UserError(f'{name} of dtype {array.dtype} are not numbers: use an array of floats '
                      '(or integers, booleans)')
  if values.ndim == 3:
    values = values[None]
  if values.ndim != 4 or values.shape[1:] != (height, width, channels):
    raise UserError(f'values of shape {values.shape} do not fit the run: use (N, {height}, '
                    f'{width}, {channels}) or ({height}, {width}, {channels})')
  if not len(values):
    raise UserError(f'values of shape {values.shape} hold no image: give at least one')
  if mask.shape not in ((height, width), values.shape[:3]):
    raise UserError(f'mask of shape {mask.shape} does not fit values of shape {values.shape}: '
                    f'use ({height}, {width}) or ({len(values)}, {height}, {width})')
  mask = np.broadcast_to(mask, values.shape[:3])
  if not np.all((mask == 0) | (mask == 1)):
    raise UserError('mask holds values other than 0 and 1 (or False and True): use 1 where a '
                    'pixel is observed, 0 elsewhere')
  empty = np.flatnonzero(mask.sum(axis=(1, 2)) == 0)
  if len(empty):
    raise UserError(f'mask of image {empty[0]} observes no pixel: observe at least one')
  observed = np.broadcast_to(mask[..., None] == 1, values.shape)
  seen = values[observed]
  low, high = VALUE_RANGE
  if not np.all(np.isfinite(seen)) or seen.min() < low or seen.max() > high:
    bad = seen[~(np.isfinite(seen) & (seen >= low) & (seen <= high))][0]
    raise UserError(f'observed value {bad} is outside the run\'s range: use values in '
                    f'[{low}, {high}] at observed pixels (NaN only at hidden ones)')
  x = np.where(observed, values, 0.0).astype(np.float32)
  return x, mask[..., None].astype(np.float32)


def chunk_size(num_images, num_samples, settings, model):
  """Images per jitted call: all, or as many as keep about 4096 latents decoded at once."""
  proposals = MODELS[model].pool + (settings.neighbours or settings.num_proposals)
  return min(num_images, max(1, 4096 // max(num_samples, proposals)))


def memory_bytes():
  """The machine's physical memory in bytes."""
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def check_num_samples(num_samples, num_images, image_shape):
  """UserError, before anything is allocated, unless num_samples completions of num_images
  images of (H, W, C) image_shape fit: each image's samples are decoded at once (at most
  MAX_SAMPLE_VALUES pixel values), all images' are kept (at most 1 / MEMORY_SHARE of the
  machine's memory)."""
  values = math.prod(image_shape)
  most = max(2, MAX_SAMPLE_VALUES // values)
  shape = 'x'.join(map(str, image_shape))
  if not 2 <= num_samples <= most:
    raise UserError(f'num_samples={num_samples} is not allowed: use an integer from 2 to {most} '
                    f'(the most whose completions of one {shape} image fit in memory at once)')
  budget = memory_bytes() // MEMORY_SHARE
  needed = 4 * num_images * num_samples * values   # float32 samples
  if needed > budget:
    fits = max(0, budget // (4 * num_images * values))
    raise UserError(f'num_samples={num_samples} of {num_images} {shape} images would take '
                    f'{needed / 2**30:.1f} GiB, over 1/{MEMORY_SHARE} of this machine\'s '
                    f'{memory_bytes() / 2**30:.0f} GiB: use num_samples <= {fits}, or complete '
                    'fewer images at a time')


def progress_line(done, total, seconds):
  """'completed done/total images, about T s left' at the pace so far."""
  return f'completed {done}/{total} images, about {seconds / done * (total - done):.0f} s left'
