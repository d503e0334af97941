"""Property test: a data folder damaged at random (files cut short, bits flipped, files deleted)
loads as the data of its intact files left, or ends in one UserError line naming the folder or a
file in it; never another exception, a hang or other pixels.

Bits are flipped only where a format can tell: anywhere in PNG and gzip files (checksums), in
the header of a plain IDX file; JPEG and plain IDX pixels have no checksum.
"""
import contextlib
import functools
import gzip
import io
import pathlib
import signal
import struct
import tempfile

from hypothesis import event, given, settings, strategies as st
import numpy as np
from PIL import Image

from conftest import small_config
from mtvae_jax import data
from mtvae_jax.errors import UserError

TIME_LIMIT_S = 60
# format -> (data.name, where bits may flip: None anywhere, n the first n bytes, 0 nowhere)
FORMATS = {'png': ('images', None), 'jpeg': ('images', 0), 'idx': ('idx', 16),
           'idx.gz': ('idx', None)}


@functools.cache
def originals(kind):
  """{file name: bytes} of a small intact data folder of format `kind`."""
  rng = np.random.default_rng(0)
  if kind.startswith('idx'):
    suffix = '.gz' if kind.endswith('.gz') else ''
    files = {}
    for name, count in (('train', 12), ('t10k', 4)):
      raw = struct.pack('>4I', 0x803, count, 5, 4) + rng.integers(0, 256, count * 20, np.uint8).tobytes()
      files[f'{name}-images-idx3-ubyte{suffix}'] = gzip.compress(raw, mtime=0) if suffix else raw
    return files
  files = {}
  for i in range(5):
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (6, 5, 3), np.uint8)).save(buffer, kind.upper())
    files[f'{i}.{kind}'] = buffer.getvalue()
  return files


class Hang(BaseException):
  """A load that took more than TIME_LIMIT_S (not an Exception, so nothing catches it)."""


@contextlib.contextmanager
def time_limit(seconds):
  def expire(signum, frame):
    raise Hang(f'data.load took more than {seconds} s')
  previous = signal.signal(signal.SIGALRM, expire)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def load(folder, name):
  """data.load of `folder` (its own cache beside it): Splits, or the UserError it raised."""
  config = small_config('gaussian', 'none').data
  config.update(name=name, path=str(folder), num_workers=0, cache_dir=str(folder) + '-cache')
  try:
    with time_limit(TIME_LIMIT_S):
      return data.load(config, seed=0)
  except UserError as error:
    return error


def write(folder, files):
  folder.mkdir()
  for name, raw in files.items():
    (folder / name).write_bytes(raw)
  return folder


damage = st.tuples(st.sampled_from(['truncate', 'flip', 'delete']), st.integers(0, 4),
                   st.floats(0, 1, exclude_max=True), st.integers(0, 7))


@settings(max_examples=150, deadline=None, derandomize=True)
@given(kind=st.sampled_from(sorted(FORMATS)), damages=st.lists(damage, min_size=1, max_size=3))
def test_a_damaged_data_folder_loads_its_intact_files_or_is_refused_in_one_line(kind, damages):
  name, flippable = FORMATS[kind]
  files = dict(originals(kind))
  names = sorted(files)
  damaged = set()
  for action, index, where, bit in damages:
    file = names[index % len(names)]
    if file not in files:
      continue
    raw = bytearray(files[file])
    if action == 'delete':
      del files[file]
      continue
    if action == 'truncate':
      del raw[int(where * len(raw)):]
    elif flippable != 0 and raw:
      raw[int(where * min(flippable or len(raw), len(raw)))] ^= 1 << bit
    files[file] = bytes(raw)
    damaged.add(file)
  with tempfile.TemporaryDirectory() as tmp:
    folder = write(pathlib.Path(tmp, 'damaged'), files)
    got = load(folder, name)
    expected = load(write(pathlib.Path(tmp, 'intact'), {
        file: originals(kind)[file] for file in files}), name)
  event(f'{kind}: {"refused" if isinstance(got, UserError) else "loaded"}')
  if isinstance(got, UserError):
    message = str(got)
    assert '\n' not in message and str(folder) in message, message
    return
  assert not isinstance(expected, UserError), f'{damaged} damaged, {expected} not raised'
  for got_split, expected_split in zip(got, expected, strict=True):
    np.testing.assert_array_equal(got_split, expected_split)
