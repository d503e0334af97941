"""Feeding batches: device-resident arrays for small sets, a grain pipeline for large ones.

A split is either an in-memory float32 array (N, H, W, C) or a `Source`, whose
images are decoded on demand. Both index the same way, so `splits.split`
cuts either. Which rows form each batch is a pure function of (seed, epoch,
step) (`epoch_order`), the same for both kinds.
"""
import operator

from absl import flags
import grain
import jax
import jax.numpy as jnp
import numpy as np

# A training split whose float32 images take more bytes than this is streamed.
IN_MEMORY_BYTES = 2 << 30


class Source:
  """Images decoded on demand from a random-access sequence of records.

  Like an array: `len`, `.shape` (N, H, W, C), `[i]` gives image i as uint8
  (H, W, C), and `[rows]` (a slice, index or boolean array) gives a `Source`
  of those rows. Picklable when `records` and `decode` are, so grain's worker
  processes can read it.
  """

  def __init__(self, records, decode, image_shape, rows=None):
    self.records = records  # e.g. a tfds data source or a list of file paths
    self.decode = decode  # record -> uint8 (H, W, C)
    self.rows = np.arange(len(records)) if rows is None else np.asarray(rows)
    self.shape = (len(self.rows), *image_shape)

  def __len__(self):
    return len(self.rows)

  def __getitem__(self, index):
    if isinstance(index, (int, np.integer)):
      return self.decode(self.records[int(self.rows[index])])
    return Source(self.records, self.decode, self.shape[1:], self.rows[index])


class _ReadRows:
  """rows (B,) -> uint8 images (B, H, W, C): the grain map over a Source."""

  def __init__(self, source):
    self.source = source

  def __call__(self, rows):
    return np.stack([self.source[row] for row in rows])


def epoch_order(seed, epoch, num_images, batch_size):
  """Rows of each training batch of `epoch`, (steps, batch_size); the remainder is dropped."""
  steps = num_images // batch_size
  order = np.random.default_rng([seed, epoch]).permutation(num_images)
  return order[:steps * batch_size].reshape(steps, batch_size)


def eval_order(num_images, batch_size):
  """All rows in order as (steps, batch_size), the last batch padded with row 0, and
  weights (steps, batch_size): 1 for an image, 0 for padding."""
  steps = -(-num_images // batch_size)
  rows = np.zeros(steps * batch_size, np.int64)
  rows[:num_images] = np.arange(num_images)
  weights = (np.arange(steps * batch_size) < num_images).astype(np.float32)
  return rows.reshape(steps, batch_size), weights.reshape(steps, batch_size)


def to_device(images):
  """An in-memory split moved to the device once; a Source stays where it is."""
  return images if isinstance(images, Source) else jax.device_put(images)


@jax.jit
def _to_float(batch):
  return batch.astype(jnp.float32) / 255.0


@jax.jit
def _gather(images, rows):  # one dispatch per batch instead of eager indexing's several
  return images[rows]


def stream(source, index_batches, num_workers):
  """uint8 host batches source[rows] for each row of `index_batches`, read by grain.

  With num_workers > 0, worker processes decode batches ahead of use;
  otherwise threads of this process do. Either way a bounded number of batches
  is held at a time.
  """
  dataset = grain.MapDataset.source(index_batches).map(_ReadRows(source))
  dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=4))
  if num_workers:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (google/grain#1355)
      flags.FLAGS.mark_as_parsed()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=2))
  return iter(dataset)


def batches(images, index_batches, num_workers=0):
  """Batches images[rows], one per row of `index_batches`.

  `images` is an array (on the device after `to_device`: the gather runs
  there, no host work) or a Source (streamed by `stream`, then float32 in
  [0, 1] on the device).
  """
  if isinstance(images, Source):
    return map(_to_float, stream(images, index_batches, num_workers))
  take = _gather if isinstance(images, jax.Array) else operator.getitem
  return (take(images, rows) for rows in index_batches)


def in_memory(images, num_workers=0, max_bytes=None):
  """A Source read into a float32 array in [0, 1] if its images take at most max_bytes as
  float32 (None: always); arrays and larger Sources unchanged."""
  if not isinstance(images, Source) or (max_bytes is not None and
                                        np.prod(images.shape) * 4 > max_bytes):
    return images
  rows, _ = eval_order(len(images), 1024)
  read = np.concatenate(list(stream(images, rows, num_workers)))[:len(images)]
  return read.astype(np.float32) / 255.0
