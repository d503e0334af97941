"""A folder of PNG/JPEG images (data.name=images), e.g. CelebA's img_align_celeba.

Every file under data.path (hidden ones aside) must be an 8-bit grayscale or
RGB PNG/JPEG. Subfolders `train/` and `test/` give the official split;
otherwise the test split is cut off by data.test_fraction. Each image is
centre-cropped to data.crop_size x data.crop_size (0: no crop), then resized
to data.image_size x data.image_size (0: no resize); all must end up the same
size. The files are checked up front (headers only) and decoded on demand; a
file that cannot be read or decoded is a UserError naming it.
"""
import contextlib
import functools
import os
import pathlib

import numpy as np
from PIL import Image

from mtvae_jax.data import cache
from mtvae_jax.data import pipeline
from mtvae_jax.data import splits
from mtvae_jax.errors import UserError

FORMATS = ('PNG', 'JPEG')
CHANNELS = {'L': 1, 'RGB': 3}


def crop_and_resize(image, crop, size):
  """A PIL image centre-cropped to crop x crop (0: none), then resized to size x size (0: none)."""
  if crop:
    left, top = (image.width - crop) // 2, (image.height - crop) // 2
    image = image.crop((left, top, left + crop, top + crop))
  if size:
    image = image.resize((size, size), Image.Resampling.BILINEAR)
  return image


def to_array(image, channels):
  """A PIL image -> uint8 (H, W, channels)."""
  return np.asarray(image, np.uint8).reshape(image.height, image.width, channels)


@contextlib.contextmanager
def _opened(path, load):
  """The PIL image of file `path`, its pixels decoded when `load`, closed on exit.

  UserError naming the file when PIL cannot open or decode it, or, before
  decoding, when its checksums (a PNG's chunk CRCs) do not match or it ends early.
  """
  image = None
  try:
    image = Image.open(path)
    if load and image.format == 'PNG':
      # Decoding alone misses damage when a cut took the checksums of the damaged data too.
      with Image.open(path) as checked:
        checked.verify()
    if load:
      image.load()
  except Exception as e:  # pylint: disable=broad-exception-caught  # PIL's many error types
    if image is not None:
      image.close()
    raise UserError(_unreadable(path, e)) from None
  with image:
    yield image


def _unreadable(path, error):
  """The one line for an image file that PIL cannot open or decode."""
  if isinstance(error, Image.UnidentifiedImageError):
    return f'data file {path} is not a PNG or JPEG image'
  if isinstance(error, Image.DecompressionBombError):
    return (f'data file {path} has more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels, too many to '
            'decode safely: use smaller PNG or JPEG images')
  reason = error.strerror if isinstance(error, OSError) and error.strerror else (
      str(error).strip().splitlines() or [type(error).__name__])[0]
  return (f'data file {path} cannot be read ({reason}): replace it with a whole PNG or JPEG '
          'image, or remove it')


def _shape(path, image, crop, size):
  """(H, W, C) that `decode` gives for the PIL image of `path`; UserError if it is no usable image."""
  kind, mode, (width, height) = image.format, image.mode, image.size
  if kind not in FORMATS:
    raise UserError(f'data file {path} is a {kind} image: use PNG or JPEG files')
  if mode not in CHANNELS:
    raise UserError(f'data file {path} has pixel type {mode}: use 8-bit grayscale (L) or RGB images')
  if crop > min(width, height):
    raise UserError(f'data file {path} is {width}x{height}, smaller than data.crop_size={crop}')
  side = size or crop
  return (side or height, side or width, CHANNELS[mode])


def decode(path, crop, size, shape):
  """An image file -> uint8 `shape` (H, W, C), cropped and resized; UserError if it is damaged
  or, changed since it was checked, gives another shape."""
  with _opened(path, load=True) as image:
    got = _shape(path, image, crop, size)
    if got != shape:
      raise UserError(f'data file {path} changed while it was read: it now gives a {got} image, '
                      f'not {shape}')
    return to_array(crop_and_resize(image, crop, size), shape[-1])


def _output_shape(path, crop, size):
  """(H, W, C) that `decode` gives for `path`, from its header; UserError if it is no usable image."""
  with _opened(path, load=False) as image:
    return _shape(path, image, crop, size)


def _stamp(path):
  """(absolute path, bytes, mtime in ns): what says that a file changed, for the cache's name."""
  stat = os.stat(path)
  return os.path.abspath(path), stat.st_size, stat.st_mtime_ns


def source(files, crop, size):
  """A pipeline.Source over image files, all checked to decode to one shape."""
  shape = _output_shape(files[0], crop, size)
  for path in files[1:]:
    other = _output_shape(path, crop, size)
    if other != shape:
      raise UserError(f'data file {path} gives a {other} image, {files[0]} a {shape} one: '
                      'use images of one size and type, or set data.crop_size / data.image_size')
  identity = cache.digest('files', [_stamp(p) for p in files], crop, size)
  return pipeline.Source([str(p) for p in files],
                         functools.partial(decode, crop=crop, size=size, shape=shape), shape, identity)


def _files(folder):
  """The image files under `folder` and its linked subfolders (each real folder once), sorted,
  hidden ones aside; UserError for a subfolder that cannot be listed or a link to nothing, rather
  than leaving their images out."""
  def refuse(error):
    raise UserError(f'data folder {error.filename} cannot be listed ({error.strerror}): make it '
                    'readable, or move it out of data.path')
  files, seen = [], set()
  for where, subfolders, names in os.walk(folder, onerror=refuse, followlinks=True):
    real = os.path.realpath(where)
    if real in seen:  # a link back up, or a second link to one folder
      subfolders.clear()
      continue
    seen.add(real)
    subfolders[:] = [name for name in subfolders if not name.startswith('.')]
    for name in names:
      path = pathlib.Path(where, name)
      if name.startswith('.'):
        continue
      if path.is_file():  # not a pipe or socket
        files.append(path)
      elif path.is_symlink() and not path.exists():
        raise UserError(f'data file {path} is a link to {os.readlink(path)}, which does not exist: '
                        'restore that file, or remove the link')
  if not files:
    raise UserError(f"data.path='{folder}' holds no image files")
  return sorted(files)


def load_folder(data_config, seed, crop, size):
  """Splits of the images under data_config.path (Sources), cropped and resized."""
  folder = pathlib.Path(data_config.path)
  if not data_config.path or not folder.is_dir():
    raise UserError(f"data.path='{data_config.path}' is not a folder: data.name="
                    f'{data_config.name} needs a folder of PNG/JPEG images')
  if (folder / 'train').is_dir() and (folder / 'test').is_dir():
    train, test = (source(_files(folder / name), crop, size) for name in ('train', 'test'))
    if train.shape[1:] != test.shape[1:]:
      raise UserError(f"data.path='{folder}': train/ gives {train.shape[1:]} images, test/ "
                      f'{test.shape[1:]}: use one size, or set data.crop_size / data.image_size')
    return splits.split(train, test, data_config, seed)
  return splits.split(source(_files(folder), crop, size), None, data_config, seed)


def load(data_config, seed):
  """data.name=images: crop and size from data.crop_size and data.image_size."""
  return load_folder(data_config, seed, data_config.crop_size, data_config.image_size)
