"""Streamed data sets decoded once into a uint8 cache file, (N, H, W, C) .npy, memory-mapped.

Decoding and resizing a JPEG costs a core more than the smallest network's
train step per image on an accelerator; reading the cache is a copy. The
cache holds every record of a `pipeline.Source` (all splits cut from it
index the same file) under data.cache_dir (default DEFAULT_DIR; NONE:
no cache, decode every time). Its name is a digest of what produced it (the
data set name, the Source's identity: the files with sizes and mtimes or the
tfds builder, version and split; crop, size; the shape), so a changed source
gets a new file instead of a stale one. It is written under a temporary name
and renamed when complete, so an interrupted decode leaves no file that is
used (and the next build deletes what a killed one left).
"""
import hashlib
import os
import pathlib
import shutil
import socket
import sys

import numpy as np
import tqdm

from mtvae_jax.data import pipeline
from mtvae_jax.errors import UserError

DEFAULT_DIR = '~/.cache/mtvae_jax/data'
NONE = 'none'
CHUNK = 256  # images per decoded batch while building


def digest(*parts):
  """A hex digest of `parts` (their repr): a Source's identity, a cache's name."""
  return hashlib.sha256(repr(parts).encode()).hexdigest()


def folder(cache_dir):
  """The cache folder that data.cache_dir names ('': DEFAULT_DIR)."""
  return pathlib.Path(cache_dir or DEFAULT_DIR).expanduser()


def path(source, name, cache_dir):
  """The cache file of all records of `source` for data set `name`."""
  shape = (len(source.records), *source.shape[1:])
  key = digest(name, source.identity, shape)[:16]
  return folder(cache_dir) / f"{name}-{'x'.join(map(str, shape))}-{key}.npy"


def _open(file, shape):
  """The uint8 array of `shape` in `file`, memory-mapped; None when missing or not such an array."""
  try:
    array = np.load(file, mmap_mode='r')
  except (OSError, ValueError):
    return None
  return array if array.shape == shape and array.dtype == np.uint8 else None


def _elsewhere(name):
  """What a user can do about a cache folder that cannot hold the cache of data set `name`."""
  return f'set data.cache_dir to a writable folder with room, or to {NONE} to decode {name} every epoch'


def _check_room(file, name, nbytes, cache_dir):
  """UserError in one line unless file's folder can be made and has nbytes free, and nothing but
  a file is at `file`."""
  where = file.parent
  try:
    where.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f"data.cache_dir='{cache_dir}': the cache folder {where} cannot be made "
                    f'({e.strerror}): {_elsewhere(name)}') from None
  if file.exists() and not file.is_file():
    raise UserError(f'the decoded cache of {name} would be written to {file}, which is not a file: '
                    f'remove what is there, or {_elsewhere(name)}')
  free = shutil.disk_usage(where).free
  if free < nbytes:
    raise UserError(f'the decoded cache of {name} needs {nbytes / 1e9:.2f} GB in {where}, which '
                    f'has {free / 1e9:.2f} GB free: free space there, set data.cache_dir to a '
                    f'folder with room, or to {NONE} to decode {name} every epoch')


def partial_path(file, pid):
  """The temporary name of `file` while process `pid` of this host writes it."""
  return file.with_name(f'{file.name}.{socket.gethostname()}.{pid}.partial')


def _alive(pid):
  """Whether process `pid` of this host exists."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's
    pass
  return True


def remove_abandoned(file):
  """Deletes the partial files of `file` that killed processes of this host left behind."""
  for partial in file.parent.glob(partial_path(file, '*').name):
    pid = partial.name.rsplit('.', 2)[1]
    if pid.isdigit() and partial.is_file() and not _alive(int(pid)):
      partial.unlink(missing_ok=True)


def build(source, file, name, num_workers):
  """Decodes every record of `source` (by grain, in num_workers processes) into `file`, the cache
  of data set `name`: a uint8 .npy (N, H, W, C), written under a temporary name and renamed when
  complete."""
  whole = source.view(None)
  partial = partial_path(file, os.getpid())
  try:
    out = np.lib.format.open_memmap(partial, mode='w+', dtype=np.uint8, shape=whole.shape)
    if hasattr(os, 'posix_fallocate'):  # the blocks now: writing a full disk through out is SIGBUS
      with open(partial, 'r+b') as f:
        os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
  except OSError as e:
    if partial.is_file():
      partial.unlink()
    raise UserError(f'the decoded cache of {name} cannot be written to {partial} '
                    f'({e.strerror}): {_elsewhere(name)}') from None
  try:
    rows = pipeline.chunks(len(whole), CHUNK)
    # On a terminal only (disable=None), and erased when done or failed: an error's line stands alone.
    with tqdm.tqdm(total=len(whole), desc='decoding', unit='images', file=sys.stderr,
                   disable=None, leave=False) as bar:
      for chunk, batch in zip(rows, pipeline.stream(whole, rows, num_workers)):
        out[chunk[0]:chunk[-1] + 1] = batch
        bar.update(len(chunk))
    out.flush()
    del out
    os.replace(partial, file)
  except BaseException:
    partial.unlink(missing_ok=True)
    raise


def cached(images, name, cache_dir, num_workers):
  """A Source as a pipeline.Cached view of its decoded cache, built first when missing;
  arrays, and every split when data.cache_dir is NONE, unchanged."""
  if cache_dir == NONE or not isinstance(images, pipeline.Source) or isinstance(
      images, pipeline.Cached):
    return images
  file = path(images, name, cache_dir)
  shape = (len(images.records), *images.shape[1:])
  array = _open(file, shape)
  if array is None:
    nbytes = int(np.prod(shape))
    remove_abandoned(file)
    _check_room(file, name, nbytes, cache_dir)
    print(f'decoding the {shape[0]:,} images of {name} once into {file} ({nbytes / 1e9:.2f} GB)',
          flush=True)
    build(images, file, name, num_workers)
    array = _open(file, shape)
  return pipeline.Cached(array, images.rows)
