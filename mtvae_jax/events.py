"""TensorBoard event files in the work directory, beside history.jsonl.

Each epoch's record becomes scalars (train/, val/, weights/, seconds,
images_per_s) at step = epoch; at epochs 1, 2, 4, 8, ... an image grid is
added as `reconstructions` where the run draws one (the VAE: validation images
and their reconstructions, original | mask | decoder 1 | decoder 2). View
with `tensorboard --logdir=<workdir or its parent>`.
"""
import functools
import pathlib

import jax

from mtvae_jax import figures

NUM_IMAGES = 8
FILE_PREFIX = 'events.out.tfevents.'  # tensorboardX's name of an event file, then time and host
SUFFIX = '.epoch'  # then the first epoch the file holds


def reconstruction_grid(conds_fn, images, key):
  """state -> (H', W', C) grid of the first `images` (N, H, W, C) and their reconstructions.

  conds_fn(images, key) -> conds gives the decoders' inputs.
  """
  images = images[:NUM_IMAGES]
  reconstruct = jax.jit(functools.partial(figures.reconstruct, conds_fn=conds_fn))

  def grid(state):
    conds, outputs = jax.device_get(reconstruct(state, images, key))
    return figures.tile(figures.reconstruction_columns(images, conds, outputs))

  return grid


class EventWriter:
  """A context manager around tensorboardX's SummaryWriter; call `write` once per epoch."""

  def __init__(self, workdir, grid=None, first_epoch=1, enabled=True):
    """grid: None, or state -> (H, W, C) image, e.g. `reconstruction_grid`.

    A run resumed at first_epoch redoes the epochs from there: the event files
    of earlier runs that start at first_epoch or later are removed, and
    TensorBoard drops the steps >= first_epoch of the others. The new file,
    named for first_epoch, is made by the first `write`, so a run stopped
    before finishing an epoch adds none. With several processes every one
    calls `write` (the image grid is a computation over all devices), but only
    the one with `enabled` writes.
    """
    self._writer, self._workdir, self._first_epoch = None, pathlib.Path(workdir), first_epoch
    self._enabled, self._grid = enabled, grid
    if enabled:
      for path in self._workdir.glob(f'{FILE_PREFIX}*{SUFFIX}*'):
        start = path.name.rsplit(SUFFIX, 1)[1]
        if start.isdigit() and int(start) >= first_epoch:
          path.unlink()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    if self._writer:
      self._writer.close()

  def write(self, record, state):
    """Scalars of `record` (one line of history.jsonl) and, at powers of two, the image grid."""
    epoch = record['epoch']
    grid = self._grid(state) if self._grid and epoch & (epoch - 1) == 0 else None
    if not self._enabled:
      return
    if not self._writer:
      # tensorboardX imports torch when that is installed: load it only when a run writes.
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._writer = tensorboardX.SummaryWriter(str(self._workdir), purge_step=self._first_epoch,
                                                filename_suffix=f'{SUFFIX}{self._first_epoch}')
    for name, value in record.items():
      if name != 'epoch':
        self._writer.add_scalar(name, value, epoch)
    if grid is not None:
      self._writer.add_image('reconstructions', grid, epoch, dataformats='HWC')
    self._writer.flush()
