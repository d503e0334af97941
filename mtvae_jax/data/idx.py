"""A folder of MNIST-format (IDX) image files, plain or gzipped.

`train-*images*` and `t10k-*images*` give the official split; a folder with a
single images file is split by data.test_fraction. Labels are not needed.
Debian's package dataset-fashion-mnist installs such a folder at
/usr/share/datasets/fashion-mnist.
"""
import gzip
import pathlib
import zlib

import numpy as np

from mtvae_jax.data import splits
from mtvae_jax.errors import UserError

PATTERNS = ('*images-idx3-ubyte', '*images-idx3-ubyte.gz', '*images.idx3-ubyte',
            '*images.idx3-ubyte.gz')


def read_images(path):
  """An IDX file of uint8 images (magic 0x00000803) -> float32 (N, H, W, 1) in [0, 1].

  UserError naming the file when it cannot be read, is damaged, or holds no pixels.
  """
  opener = gzip.open if path.suffix == '.gz' else open
  try:
    with opener(path, 'rb') as f:
      raw = f.read()
  except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    raise UserError(f'data file {path} cannot be read ({reason}): replace it with a whole '
                    'IDX file') from None
  if len(raw) < 16:
    raise UserError(f'data file {path} has {len(raw)} bytes, too few for the 16 of an IDX header '
                    'of images')
  magic, count, height, width = (int(v) for v in np.frombuffer(raw[:16], '>u4'))
  if magic != 0x00000803:
    gzipped = ': it is gzipped, so its name must end in .gz' if raw[:2] == b'\x1f\x8b' else ''
    raise UserError(f'data file {path} is not an IDX file of uint8 images (its magic number is '
                    f'{magic:#010x}, not 0x00000803){gzipped}')
  if len(raw) != 16 + count * height * width:
    raise UserError(f'data file {path} holds {len(raw) - 16} bytes of pixels, its header '
                    f'promises {count}x{height}x{width}')
  if not count * height * width:
    raise UserError(f'data file {path} holds {count} images of {height}x{width} pixels: use a '
                    'file of at least one image of at least 1x1 pixels')
  images = np.frombuffer(raw, np.uint8, offset=16).reshape(count, height, width, 1)
  return images.astype(np.float32) / 255.0


def load(data_config, seed):
  folder = pathlib.Path(data_config.path)
  if not data_config.path or not folder.is_dir():
    raise UserError(f"data.path='{data_config.path}' is not a folder: data.name=idx needs a "
                    'folder of MNIST-format *images-idx3-ubyte[.gz] files')
  files = sorted({p for pattern in PATTERNS for p in folder.glob(pattern)})
  if not files:
    raise UserError(f"data.path='{folder}' holds no *images-idx3-ubyte[.gz] file")
  train = [p for p in files if p.name.startswith('train')]
  test = [p for p in files if p.name.startswith('t10k') or p.name.startswith('test')]
  if len(train) == 1 and len(test) == 1:
    train_images, test_images = read_images(train[0]), read_images(test[0])
    if train_images.shape[1:] != test_images.shape[1:]:
      raise UserError(f'data files {train[0]} and {test[0]} hold images of different sizes')
    return splits.split(train_images, test_images, data_config, seed)
  if len(files) == 1:
    return splits.split(read_images(files[0]), None, data_config, seed)
  raise UserError(f"data.path='{folder}' holds {len(files)} images files "
                  f"({', '.join(p.name for p in files)}): expected one train-* and one t10k-* "
                  'file, or a single file')
