"""Files in and out of a completion: the user's observed pixels, and the completed arrays and panel.

Input: an .npz with arrays `values` (N, H, W, C) or (H, W, C) and `mask`
(N, H, W) or (H, W), 1 where observed (NaN allowed in `values` where the mask
is 0), or an image file (PNG, JPEG, ...) with a mask image whose nonzero
pixels are the observed ones. Output: an .npz (`mean`, `std`, `samples`,
`mask`) and, beside it, a PNG panel: per image, observed | mean | std | the
first samples.
"""
import pathlib
import zipfile

import numpy as np
from PIL import Image

from mtvae_jax import completion
from mtvae_jax import figures
from mtvae_jax.errors import UserError

PANEL_IMAGES = 8    # images (rows) in the panel
PANEL_SAMPLES = 4   # samples (columns) in the panel


def _image(path, what, mode=None):
  """(H, W, C) float array in [0, 1] of the image file `path`."""
  try:
    with Image.open(path) as image:
      image = image.convert(mode) if mode else image
      array = np.asarray(image, np.float32) / 255.0
  except (OSError, ValueError) as e:
    raise UserError(f"{what} '{path}' cannot be read as an image: {e}") from None
  return array[..., None] if array.ndim == 2 else array


def read_input(path, mask_path, channels):
  """(values, mask) from an .npz, or from an image and a mask PNG."""
  if path.endswith('.npz'):
    if mask_path:
      raise UserError('--mask is for an image --input: an .npz holds its own mask array')
    try:
      with np.load(path) as arrays:
        arrays = {name: arrays[name] for name in arrays.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
      raise UserError(f"--input '{path}' cannot be read as an .npz: {e}") from None
    missing = {'values', 'mask'} - set(arrays)
    if missing:
      raise UserError(f"--input '{path}' lacks the array(s) {', '.join(sorted(missing))}: save "
                      'values and mask, e.g. np.savez(path, values=..., mask=...)')
    return arrays['values'], arrays['mask']
  if not mask_path:
    raise UserError(f"--input '{path}' is an image: give its observed pixels with --mask=PNG")
  values = _image(path, '--input', 'L' if channels == 1 else 'RGB')
  mask = _image(mask_path, '--mask', 'L')[..., 0] > 0
  if mask.shape != values.shape[:2]:
    raise UserError(f'--mask of {mask.shape[1]}x{mask.shape[0]} pixels does not fit the '
                    f'{values.shape[1]}x{values.shape[0]} image: use a mask of the same size')
  return values, mask.astype(np.float32)


def panel_columns(x, mask, out):
  """observed | mean | std | samples of the first PANEL_IMAGES images."""
  rows = slice(0, PANEL_IMAGES)
  std = out['std'][rows]
  columns = [figures.Column('observed', figures.observed(x[rows], mask[rows])),
             figures.Column('mean', out['mean'][rows]),
             figures.Column('std', std, 'magma', float(max(std.max(), 1e-6)))]
  return columns + [figures.Column(f'sample {i + 1}', out['samples'][rows, i])
                    for i in range(min(PANEL_SAMPLES, out['samples'].shape[1]))]


def complete_files(workdir, input_path, mask_path, output, num_samples=32, method='posterior',
                   seed=0):
  """Reads the input, completes it (the run in `workdir`), writes the .npz and the PNG panel;
  returns their paths. Raises UserError for unreadable, unfitting or unwritable files."""
  output = pathlib.Path(output)
  if output.suffix != '.npz':
    raise UserError(f"--output='{output}' is not allowed: give a file name ending in .npz")
  if not output.parent.is_dir():
    raise UserError(f"--output='{output}': folder '{output.parent}' does not exist")
  helper = completion.completer(workdir)
  image_shape = helper.run.splits.test.shape[1:]
  values, mask = read_input(input_path, mask_path, image_shape[-1])
  x, mask = completion.check_inputs(values, mask, image_shape)
  out = completion.complete_arrays(helper, x, mask, num_samples, method, seed)
  panel = output.with_suffix('.png')
  try:
    np.savez(output, mask=mask[..., 0], **out)
    figures.save_image_grid(panel, panel_columns(x, mask, out))
  except OSError as e:
    raise UserError(f"--output='{output}' cannot be written: {e.strerror}") from None
  return output, panel
