"""TensorBoard event files in the work directory, beside history.jsonl.

Each epoch's record becomes scalars (train/, val/, weights/, seconds,
images_per_s) at step = epoch; at epochs 1, 2, 4, 8, ... a grid of
validation images and their reconstructions (original | mask | decoder 1 |
decoder 2) is added as `reconstructions`. View with
`tensorboard --logdir=<workdir or its parent>`.
"""
import functools
import pathlib

import jax

from mtvae_jax import figures

NUM_IMAGES = 8


class EventWriter:
  """A context manager around tensorboardX's SummaryWriter; call `write` once per epoch."""

  def __init__(self, workdir, conds_fn, images, key, first_epoch=1, enabled=True):
    """conds_fn(images, key) -> conds gives the decoders' inputs; `images` (N, H, W, C).

    TensorBoard drops the steps >= first_epoch that earlier event files in
    `workdir` hold (a run resumed at first_epoch redoes them). With several
    processes every one calls `write` (the image grid is a computation over
    all devices), but only the one with `enabled` writes.
    """
    self._writer = None
    if enabled:
      # tensorboardX imports torch when that is installed: load it only when a run starts.
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._writer = tensorboardX.SummaryWriter(str(pathlib.Path(workdir)), purge_step=first_epoch)
    self._images = images[:NUM_IMAGES]
    self._key = key
    self._reconstruct = jax.jit(functools.partial(figures.reconstruct, conds_fn=conds_fn))

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    if self._writer:
      self._writer.close()

  def write(self, record, state):
    """Scalars of `record` (one line of history.jsonl) and, at powers of two, the image grid."""
    epoch = record['epoch']
    grid_due = epoch & (epoch - 1) == 0
    if grid_due:
      conds, outputs = jax.device_get(self._reconstruct(state, self._images, self._key))
    if not self._writer:
      return
    for name, value in record.items():
      if name != 'epoch':
        self._writer.add_scalar(name, value, epoch)
    if grid_due:
      grid = figures.tile(figures.reconstruction_columns(self._images, conds, outputs))
      self._writer.add_image('reconstructions', grid, epoch, dataformats='HWC')
    self._writer.flush()
