"""Files in and out of a completion: the user's observed pixels, and the completed arrays and panel.

Input: an .npz with arrays `values` (N, H, W, C) or (H, W, C) and `mask`
(N, H, W) or (H, W), 1 where observed (NaN allowed in `values` where the mask
is 0), or an image file (PNG, JPEG, ...; 8 bits, or 16 of grey) with a mask
image whose nonzero pixels are the observed ones. Output: an .npz (`mean`,
`std`, `samples`, `mask`) and, beside it, a PNG panel of the same name: per
image, observed | mean | std | the first samples. Neither may be an input; an
existing one is replaced only when asked (overwrite), and whole: each is
written to a temporary file that then takes its name.
"""
import os
import pathlib
import zipfile

import numpy as np
from PIL import Image

from mtvae_jax import completion
from mtvae_jax import figures
from mtvae_jax.errors import UserError

PANEL_IMAGES = 8    # images (rows) in the panel
PANEL_SAMPLES = 4   # samples (columns) in the panel
NPY_MAGIC = b'\x93NUMPY'   # how a .npy file begins
GREY_MODES = {'1': 255, 'L': 255, 'LA': 255, 'I;16': 65535, 'I;16B': 65535, 'I;16L': 65535,
              'I': 65535}   # PIL modes read as grey, by their largest value
LUMA = np.asarray([0.299, 0.587, 0.114], np.float32)   # ITU-R 601-2 grey of RGB, as PIL's 'L'
SAVE_HINT = 'save values and mask together with np.savez(path, values=..., mask=...)'


def _image(path, what):
  """(H, W, 1) grey or (H, W, 3) RGB float32 array in [0, 1] of the image file `path`, scaled by
  its bit depth."""
  try:
    with Image.open(path) as image:
      top = GREY_MODES.get(image.mode)
      if top is None:
        array, top = np.asarray(image.convert('RGB'), np.float64), 255
      else:
        grey = image.convert('L') if image.mode in ('1', 'LA') else image
        array = np.asarray(grey, np.float64)[..., None]
  except (OSError, ValueError, SyntaxError) as e:
    raise UserError(f"{what} '{path}' cannot be read as an image: {e}") from None
  if array.min() < 0 or array.max() > top:
    raise UserError(f"{what} '{path}' holds pixel values outside 0 to {top}: save it as an 8- or "
                    '16-bit image')
  return (array / top).astype(np.float32)


def fit_channels(values, channels):
  """An image's (H, W, 1 or 3) values with `channels` channels: grey repeated, or RGB's luma."""
  if values.shape[-1] == channels:
    return values
  return np.repeat(values, channels, -1) if values.shape[-1] == 1 else (values @ LUMA)[..., None]


def _head(path):
  """The first bytes of the --input file `path`; UserError if it cannot be read or is empty."""
  try:
    with open(path, 'rb') as f:
      head = f.read(len(NPY_MAGIC))
  except OSError as e:
    raise UserError(f"--input '{path}' cannot be read: {e.strerror}") from None
  if not head:
    raise UserError(f"--input '{path}' is an empty file: give an .npz of values and mask, or an "
                    'image with --mask')
  return head


def _npz(path):
  """{name: array} of the .npz file `path`, with `values` and `mask`."""
  try:
    with np.load(path) as arrays:
      arrays = {name: arrays[name] for name in arrays.files}
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise UserError(f"--input '{path}' cannot be read as an .npz: {e}") from None
  missing = {'values', 'mask'} - set(arrays)
  if missing:
    raise UserError(f"--input '{path}' lacks the array(s) {', '.join(sorted(missing))}: "
                    f'{SAVE_HINT}')
  return arrays


def read_input(path, mask_path):
  """(values, mask, image): the arrays of an .npz (image False), or an image's (H, W, 1 or 3)
  values and its mask PNG (image True). What the file holds decides, its name only names it."""
  head = _head(path)
  if head == NPY_MAGIC:
    raise UserError(f"--input '{path}' is a .npy file, which holds one array: {SAVE_HINT}")
  if zipfile.is_zipfile(path):
    if mask_path:
      raise UserError('--mask is for an image --input: an .npz holds its own mask array')
    arrays = _npz(path)
    return arrays['values'], arrays['mask'], False
  if str(path).endswith('.npz'):
    raise UserError(f"--input '{path}' is not an .npz (a zip archive of arrays), but named one: "
                    f'{SAVE_HINT}')
  values = _image(path, '--input')
  if not mask_path:
    raise UserError(f"--input '{path}' is an image: give its observed pixels with --mask=PNG")
  mask = _image(mask_path, '--mask').max(axis=-1) > 0
  if mask.shape != values.shape[:2]:
    raise UserError(f'--mask of {mask.shape[1]}x{mask.shape[0]} pixels does not fit the '
                    f'{values.shape[1]}x{values.shape[0]} image: use a mask of the same size')
  return values, mask.astype(np.float32), True


def _same(first, second):
  """Whether two paths name one file (or would, once written)."""
  first, second = pathlib.Path(first), pathlib.Path(second)
  return first.resolve() == second.resolve() or (
      first.exists() and second.exists() and os.path.samefile(first, second))


def check_output(output, inputs, overwrite=False):
  """(output .npz, panel .png) paths; UserError where either is one of `inputs` ({flag: path or
  None}), or exists and not `overwrite`, or cannot be written."""
  output = pathlib.Path(output)
  if output.suffix != '.npz':
    raise UserError(f"--output='{output}' is not allowed: give a file name ending in .npz")
  if not output.parent.is_dir():
    raise UserError(f"--output='{output}': folder '{output.parent}' does not exist")
  panel = output.with_suffix('.png')
  for written in (output, panel):
    for flag, path in inputs.items():
      if path and _same(written, path):
        what = '' if written == output else f' with its panel {panel}'
        raise UserError(f"--output='{output}' would replace {flag} '{path}'{what}: give an "
                        '--output whose .npz and .png are not inputs')
  existing = [str(path) for path in (output, panel) if path.exists()]
  if existing and not overwrite:
    raise UserError(f"--output='{output}': {' and '.join(existing)} exist(s): choose another "
                    '--output, or give --overwrite to replace them')
  return output, panel


def panel_columns(x, mask, out):
  """observed | mean | std | samples of the first PANEL_IMAGES images."""
  rows = slice(0, PANEL_IMAGES)
  std = out['std'][rows]
  columns = [figures.Column('observed', figures.observed(x[rows], mask[rows])),
             figures.Column('mean', out['mean'][rows]),
             figures.Column('std', std, 'magma', float(max(std.max(), 1e-6)))]
  return columns + [figures.Column(f'sample {i + 1}', out['samples'][rows, i])
                    for i in range(min(PANEL_SAMPLES, out['samples'].shape[1]))]


def _write_whole(path, save):
  """save(temporary path of path's suffix), then that file takes `path`'s name."""
  temporary = path.with_name(f'.{path.stem}.{os.getpid()}.tmp{path.suffix}')
  try:
    save(temporary)
    os.replace(temporary, path)
  finally:
    temporary.unlink(missing_ok=True)


def complete_files(workdir, input_path, mask_path, output, num_samples=32, method='posterior',
                   seed=0, overwrite=False, progress=None):
  """Reads the input, completes it (the run in `workdir`), writes the .npz and the PNG panel;
  returns their paths. Raises UserError for unreadable, unfitting or unwritable files: those
  and the arguments are checked before the run is loaded, what depends on its images before
  it is calibrated. progress: as completion.complete_arrays's."""
  output, panel = check_output(output, {'--input': input_path, '--mask': mask_path}, overwrite)
  values, mask, image = read_input(input_path, mask_path)
  if method not in completion.METHODS:
    raise UserError(f"method={method!r} is not allowed: use one of "
                    f"{', '.join(completion.METHODS)}")
  if num_samples < 2:
    raise UserError(f'num_samples={num_samples} is not allowed: use an integer >= 2')
  run = completion.load_run(workdir)
  image_shape = run.splits.test.shape[1:]
  x, mask = completion.check_inputs(fit_channels(values, image_shape[-1]) if image else values,
                                    mask, image_shape)
  completion.check_num_samples(num_samples, len(x), image_shape)
  out = completion.complete_arrays(completion.completer(workdir, run), x, mask, num_samples,
                                   method, seed, progress=progress)
  try:
    _write_whole(output, lambda path: np.savez(path, mask=mask[..., 0], **out))
    _write_whole(panel, lambda path: figures.save_image_grid(path, panel_columns(x, mask, out)))
  except OSError as e:
    raise UserError(f"--output='{output}' cannot be written: {e.strerror}") from None
  return output, panel
