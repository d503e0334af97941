"""Figures as PNG, and the image grids that TensorBoard shows too.

Plots use matplotlib's object-oriented API (`Figure` rendered by Agg), so
importing this module never changes the pyplot backend of a notebook;
matplotlib itself is imported by the first plot.
"""
from typing import NamedTuple

import jax
import numpy as np

from mtvae_jax import models

DECODER_TITLES = {'recon': 'p(x | z)', 'recon_cond': 'p(x | z, m)'}
UNOBSERVED = 0.5  # grey for the pixels a mask hides
# The y axis of losses.png's left panel, by regularizer, and of its right panel.
REGULARIZER_LABELS = {'kl': 'KL divergence per image (nats)',
                      'vq': 'codebook + commitment loss per latent vector'}
RECON_LABEL = 'mean squared error per pixel value'


def _figure(**kwargs):
  """A matplotlib Figure of `kwargs`, rendered by Agg (matplotlib, slow to import, only here)."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  return Figure(**kwargs)


class Column(NamedTuple):
  """One column of an image grid: images (N, H, W, C) drawn with `cmap` on [0, vmax].

  A column of another colour map than gray holds values rather than images,
  and gets a colour bar.
  """
  title: str
  images: np.ndarray
  cmap: str = 'gray'
  vmax: float = 1.0


def reconstruct(state, images, key, *, conds_fn):
  """Evaluation-mode reconstructions: (conds, {term: (B, H, W, C)}) for conds_fn(images, key)."""
  mask_key, z_key = jax.random.split(key)
  conds = conds_fn(images, mask_key)
  outputs, _ = state.apply_fn(models.variables(state), images, conds, z_key, train=False)
  return conds, outputs


def observed(images, mask):
  """The observed pixels of `images` (N, H, W, C), the others grey."""
  return np.where(np.asarray(mask) > 0, images, UNOBSERVED)


def reconstruction_columns(images, conds, outputs):
  """original | mask | decoder 1 | decoder 2, for the decoders the model has."""
  columns = [Column('original', np.asarray(images))]
  if conds.get('recon_cond') is not None:
    columns.append(Column('mask', observed(images, conds['recon_cond'][..., :1])))
  columns += [Column(title, np.asarray(outputs[name]))
              for name, title in DECODER_TITLES.items() if name in outputs]
  return columns


def lay_out(cells, gap=1, fill=1.0):
  """Cells (R, K, H, W, C) as one (R * (H + gap) - gap, K * (W + gap) - gap, C) image, rows of
  cells top to bottom, `fill` in the gaps between them."""
  rows, columns, height, width, channels = cells.shape
  cells = np.pad(cells, ((0, 0), (0, 0), (0, gap), (0, gap), (0, 0)), constant_values=fill)
  grid = cells.transpose(0, 2, 1, 3, 4).reshape(rows * (height + gap), columns * (width + gap),
                                                channels)
  return grid[:rows * (height + gap) - gap, :columns * (width + gap) - gap]


def tile(columns, gap=1):
  """The columns side by side as one (N * (H + gap) - gap, K * (W + gap) - gap, C) image."""
  cells = np.stack([np.clip(column.images / column.vmax, 0.0, 1.0) for column in columns], axis=1)
  return lay_out(cells.astype(np.float32), gap)


def save_image_grid(path, columns, row_titles=()):
  """One image per cell, a title over each column (and left of each row), a colour bar under each
  column of values (`Column`), as PNG to `path`."""
  rows = len(columns[0].images)
  bars = any(column.cmap != 'gray' for column in columns)
  fig = _figure(figsize=(1.3 * len(columns), 1.3 * rows + 0.3 + 0.5 * bars), layout='constrained')
  axes = fig.subplots(rows, len(columns), squeeze=False)
  for j, column in enumerate(columns):
    axes[0, j].set_title(column.title, fontsize=9)
    for i in range(rows):
      image = column.images[i]
      shown = axes[i, j].imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap=column.cmap,
                                vmin=0.0, vmax=column.vmax, interpolation='nearest')
      axes[i, j].set_axis_off()
    if column.cmap != 'gray':
      bar = fig.colorbar(shown, ax=axes[:, j], location='bottom', fraction=0.5 / (1.3 * rows),
                         aspect=10)
      bar.ax.tick_params(labelsize=7)
  for ax, title in zip(axes[:, 0], row_titles):
    ax.text(-0.1, 0.5, title, rotation=90, ha='right', va='center', fontsize=9,
            transform=ax.transAxes)
  fig.savefig(path, dpi=100)


def save_grid(path, grid, title, column_titles=()):
  """A uint8 image grid (H, W, C) as PNG to `path`, pixel for pixel, under `title`; with
  column_titles, one over each of that many equally wide columns of the grid."""
  height, width, _ = grid.shape
  dpi, header = 100, 16 * (1 + bool(column_titles))  # pixels above the grid for the titles
  fig = _figure(figsize=(width / dpi, (height + header) / dpi), dpi=dpi)
  ax = fig.add_axes((0.0, 0.0, 1.0, height / (height + header)))
  # RGB, not a gray colour map: its lookup table would move some values by one.
  ax.imshow(np.broadcast_to(grid, (height, width, 3)), interpolation='nearest')
  ax.set_axis_off()
  fig.text(0.5, 1.0 - 2 / (height + header), title, ha='center', va='top', fontsize=8)
  for j, column_title in enumerate(column_titles):
    ax.text((j + 0.5) / len(column_titles), 1.0, column_title, ha='center', va='bottom',
            fontsize=7, transform=ax.transAxes)
  fig.savefig(path, dpi=dpi)


def loss_metrics(regularizer):
  """The history's metrics of the loss-curve panels: the KL or VQ term, decoder 1's
  reconstruction."""
  return f'val/{regularizer}_loss', 'val/recon_loss'


def loss_curves(histories, metrics):
  """{'epoch': (E,), metric: (R, E)} of R runs' histories [[record, ...], ...] over the epochs
  where every run has every one of `metrics`, or None where there is no such epoch."""
  by_epoch = [{r['epoch']: r for r in history if all(m in r for m in metrics)}
              for history in histories]
  epochs = sorted(set.intersection(*(set(records) for records in by_epoch)))
  if not epochs:
    return None
  return {'epoch': np.array(epochs),
          **{m: np.array([[records[e][m] for e in epochs] for records in by_epoch])
             for m in metrics}}


def save_loss_curves(path, histories, regularizer):
  """Validation losses per epoch of each label of `histories`: {label: a run's history
  [record, ...], or the histories of its folds [[record, ...], ...]}, the mean over folds with a
  band of ± one standard deviation. Labels without an epoch of both losses are left out.

  Left: the KL or VQ term; right: the reconstruction loss of decoder 1 (the
  thesis's figures 4.2 and 4.4-4.6).
  """
  from matplotlib import ticker  # pylint: disable=import-outside-toplevel
  panels = zip(loss_metrics(regularizer), (f'{regularizer.upper()} loss',
                                           'reconstruction loss, decoder 1'),
               (REGULARIZER_LABELS[regularizer], RECON_LABEL))
  curves = {label: loss_curves(runs if runs and isinstance(runs[0], list) else [runs],
                               loss_metrics(regularizer)) for label, runs in histories.items()}
  fig = _figure(figsize=(10, 3.8), layout='constrained')
  for ax, (metric, title, ylabel) in zip(fig.subplots(1, 2), panels):
    for label, curve in curves.items():
      if curve is None:
        continue
      values = curve[metric]
      mean, std = values.mean(0), values.std(0, ddof=1) if len(values) > 1 else 0 * values[0]
      line, = ax.plot(curve['epoch'], mean, label=label, marker='.' if len(mean) <= 30 else None)
      ax.fill_between(curve['epoch'], mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set(title=f'validation {title}', xlabel='epoch', ylabel=ylabel, yscale='log')
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.legend(fontsize=7)
  fig.savefig(path, dpi=100)


def save_sparse_curve(path, curve):
  """Test reconstruction error against observed pixels, one line per sampling type."""
  fig = _figure(figsize=(6, 4), layout='constrained')
  ax = fig.subplots()
  for sampling, errors in curve['errors'].items():
    ax.plot(curve['num_pixels'], errors, marker='o', label=f'{sampling} sampling')
  for key, label, style in (('unconditioned', 'this model, no pixels', ':'),
                            ('baseline', 'baseline, unconditioned', '--')):
    if curve.get(key) is not None:
      ax.axhline(curve[key], color='gray' if key == 'baseline' else 'black', linestyle=style,
                 label=label)
  ax.set_xscale('symlog', linthresh=1)
  ax.set(xlabel='observed pixels', ylabel='test MSE', yscale='log',
         xlim=(0, max(curve['num_pixels'])))
  ax.legend()
  fig.savefig(path, dpi=100)

