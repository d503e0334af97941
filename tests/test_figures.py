"""Figures: colour bars for value columns, labelled axes, titled image grids."""
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from conftest import ROOT
from conftest import device_env
from mtvae_jax import figures


@pytest.fixture
def drawn(monkeypatch):
  """A list that gets every matplotlib Figure that `figures` makes from now on."""
  made, make = [], figures._figure
  monkeypatch.setattr(figures, '_figure', lambda **kwargs: made.append(make(**kwargs)) or made[-1])
  return made


def test_columns_of_values_get_a_colour_bar_and_images_none(tmp_path, drawn):
  images = np.random.default_rng(0).random((3, 4, 4, 1))
  columns = [figures.Column('original', images), figures.Column('mean', images),
             figures.Column('std', images / 4, 'magma', 0.3),
             figures.Column('|error|', images / 5, 'magma', 0.3)]
  figures.save_image_grid(tmp_path / 'uncertainty.png', columns)
  [fig] = drawn
  bars = [ax for ax in fig.axes if ax not in fig.axes[:12]]  # after the 3 x 4 image cells
  assert len(fig.axes) == 12 + 2 and len(bars) == 2
  assert [bar.get_xlim() for bar in bars] == [(0.0, 0.3)] * 2  # the columns' shared scale


@pytest.mark.parametrize('regularizer', ['kl', 'vq'])
def test_both_loss_panels_label_their_y_axis(tmp_path, drawn, regularizer):
  history = [{'epoch': e, f'val/{regularizer}_loss': 1.0 / e, 'val/recon_loss': 0.1 / e}
             for e in (1, 2, 3)]
  figures.save_loss_curves(tmp_path / 'losses.png', {'multi': history}, regularizer)
  [fig] = drawn
  assert [ax.get_ylabel() for ax in fig.axes] == [figures.REGULARIZER_LABELS[regularizer],
                                                   figures.RECON_LABEL]


def test_the_folds_of_a_row_are_drawn_as_their_mean_over_the_epochs_they_all_have(tmp_path,
                                                                                 drawn):
  folds = [[{'epoch': e, 'val/kl_loss': scale * e, 'val/recon_loss': scale / e} for e in epochs]
           for scale, epochs in ((1.0, (1, 2, 3)), (3.0, (1, 2)))]
  no_epoch = [[{'epoch': 1, 'val/recon_loss': 1.0}]]  # no KL term: left out
  figures.save_loss_curves(tmp_path / 'losses.png', {'row': folds, 'empty': no_epoch}, 'kl')
  [fig] = drawn
  [kl], [recon] = (ax.get_lines() for ax in fig.axes)
  np.testing.assert_allclose(kl.get_xdata(), [1, 2])
  np.testing.assert_allclose(kl.get_ydata(), [2.0, 4.0])
  np.testing.assert_allclose(recon.get_ydata(), [2.0, 1.0])


def test_a_grid_is_drawn_pixel_for_pixel_under_its_titles(tmp_path, drawn):
  grid = np.random.default_rng(0).integers(0, 256, (40, 60, 1), np.uint8)  # gray: each value
  figures.save_grid(tmp_path / 'given_pixels.png', grid, 'a test image', ('left', 'middle', 'right'))
  png = np.asarray(Image.open(tmp_path / 'given_pixels.png'))
  np.testing.assert_array_equal(png[-40:, :, :3], np.broadcast_to(grid, (40, 60, 3)))
  assert png.shape[1] == 60 and png[:-40].min() < 128  # text above the grid
  [fig] = drawn
  texts = [text.get_text() for text in fig.texts + fig.axes[0].texts]
  assert texts == ['a test image', 'left', 'middle', 'right']


def test_importing_the_package_leaves_out_what_only_some_commands_use():
  heavy = ('grain', 'matplotlib', 'requests', 'tensorboardX', 'tensorflow_datasets')
  result = subprocess.run(
      [sys.executable, '-c', f'import sys, mtvae_jax; print([m for m in {heavy} if m in sys.modules])'],
      cwd=ROOT, capture_output=True, text=True, timeout=120, env=device_env())
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == '[]'
