"""Feeding batches: device-resident arrays for small sets, a grain pipeline for large ones.

A split is either an in-memory float32 array (N, H, W, C) or a `Source`, whose
images are decoded on demand, or a `Cached` Source, whose images are rows of a
uint8 array decoded once (`data.cache`). All index the same way, so
`splits.split` cuts any. Which rows form each batch is a pure function of
(seed, epoch, step) (`epoch_order`), the same for every kind.
"""
import collections
import concurrent.futures
import operator

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from mtvae_jax import parallel

# A training split whose float32 images take more bytes than this is streamed.
IN_MEMORY_BYTES = 2 << 30
# A streamed split's uint8 cache is held on each device when the whole cache takes at most this
# share of the device's memory (CelebA's 2.5 GB does on any accelerator of 10 GB or more), or,
# on a device that does not report its memory (a CPU, whose memory is host RAM), this many bytes.
DEVICE_SHARE = 0.25
CPU_DEVICE_BYTES = 2 << 30


class Source:
  """Images decoded on demand from a random-access sequence of records.

  Like an array: `len`, `.shape` (N, H, W, C), `[i]` gives image i as uint8
  (H, W, C), and `[rows]` (a slice, index or boolean array) gives a Source of
  those rows. `identity` is a digest of what the records and decode are (files
  with sizes and mtimes, a tfds split; crop, size), so a cache of them is named
  by it. Picklable when `records` and `decode` are, so grain's worker
  processes can read it.
  """

  def __init__(self, records, decode, image_shape, identity, rows=None):
    self.records = records  # e.g. a tfds data source or a list of file paths
    self.decode = decode  # record -> uint8 (H, W, C)
    self.identity = identity
    self.rows = np.arange(len(records)) if rows is None else np.asarray(rows)
    self.shape = (len(self.rows), *image_shape)

  def __len__(self):
    return len(self.rows)

  def __getitem__(self, index):
    if isinstance(index, (int, np.integer)):
      return self.decode(self.records[int(self.rows[index])])
    return self.view(self.rows[index])

  def view(self, rows):
    """The images of `rows` of the records (all when None), as a Source of the same kind."""
    return Source(self.records, self.decode, self.shape[1:], self.identity, rows)

  def read(self, rows):
    """rows (B,) -> uint8 images (B, H, W, C), decoded one by one."""
    return np.stack([self[row] for row in rows])


class Cached(Source):
  """A Source whose records are the images themselves: rows of a uint8 array (N_all, H, W, C),
  the decoded cache memory-mapped on the host or, after `to_device`, held on the device."""

  def __init__(self, array, rows=None):
    super().__init__(array, np.asarray, array.shape[1:], None, rows)

  def view(self, rows):
    return Cached(self.records, rows)

  def read(self, rows):
    """rows (B,) -> uint8 images (B, H, W, C): one copy out of the host array. (Reading in
    ascending order would need a second copy to restore the batch's order, halving the rate,
    and B random rows of a large file are too far apart to gain from it.)"""
    return self.records[self.rows[rows]]


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


def device_budget():
  """Bytes of uint8 cache each device may hold: DEVICE_SHARE of its memory, or CPU_DEVICE_BYTES
  where the device does not report it."""
  stats = jax.local_devices()[0].memory_stats()
  if stats and 'bytes_limit' in stats:
    return int(stats['bytes_limit'] * DEVICE_SHARE)
  return CPU_DEVICE_BYTES


def chunks(num_images, size):
  """All rows in order, in consecutive chunks of `size` (the last one shorter): a list of (<=size,)."""
  return [np.arange(start, min(start + size, num_images)) for start in range(0, num_images, size)]


def to_device(images, max_cache_bytes=None):
  """An in-memory split copied to every device once (parallel.replicate); so is the whole uint8
  cache of a Cached split when it takes at most max_cache_bytes (None: `device_budget()`);
  other Sources, and larger caches (memory-mapped), stay on the host."""
  if isinstance(images, Cached):
    budget = device_budget() if max_cache_bytes is None else max_cache_bytes
    if images.records.nbytes <= budget:
      return Cached(parallel.replicate(images.records), images.rows)
  return images if isinstance(images, Source) else parallel.replicate(images)


@jax.jit
def _to_float(batch):
  return batch.astype(jnp.float32) / 255.0


@jax.jit
def _gather(images, rows):  # one dispatch per batch instead of eager indexing's several
  # Each device gathers the rows of its own shard of the batch; uint8 cache rows become float32
  # there, by the same _to_float as streamed batches, so either way the values are the same.
  batch = jax.lax.with_sharding_constraint(images[rows], parallel.sharded())
  return _to_float(batch) if batch.dtype == jnp.uint8 else batch


def _read_ahead(read, index_batches, depth=4):
  """read(rows) for each row of `index_batches`, by two threads, up to `depth` batches ahead."""
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    ahead = collections.deque()
    for rows in index_batches:
      ahead.append(pool.submit(read, rows))
      if len(ahead) == depth:
        yield ahead.popleft().result()
    while ahead:
      yield ahead.popleft().result()


def stream(source, index_batches, num_workers):
  """uint8 host batches source[rows] for each row of `index_batches`, a bounded number ahead.

  A Cached source is read by threads of this process (a copy out of the
  memory map, which releases the GIL; grain's overhead per batch would be
  larger than the copy). Others are decoded by grain: with num_workers > 0 in
  worker processes, otherwise in threads of this process.
  """
  if isinstance(source, Cached):
    return _read_ahead(source.read, index_batches)
  import grain  # pylint: disable=import-outside-toplevel  # only for streamed Sources
  dataset = grain.MapDataset.source(index_batches).map(source.read)
  dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=4))
  if num_workers:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (google/grain#1355)
      flags.FLAGS.mark_as_parsed()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=2))
  return iter(dataset)


def batches(images, index_batches, num_workers=0):
  """Batches images[rows], one per row of `index_batches`.

  `images` is an array or a Cached split whose cache is on the devices (after
  `to_device`: the gather runs there, no host work, and gives a batch split
  over the devices, float32) or another Source (each process streams its
  share of every batch with `stream`; the shares form one global batch,
  float32 in [0, 1] on the devices).
  """
  if isinstance(images, Cached) and isinstance(images.records, jax.Array):
    return (_gather(images.records, images.rows[rows]) for rows in index_batches)
  if isinstance(images, Source):
    shares = stream(images, parallel.process_rows(np.asarray(index_batches)), num_workers)
    return (_to_float(parallel.from_process_batches(share)) for share in shares)
  take = _gather if isinstance(images, jax.Array) else operator.getitem
  return (take(images, rows) for rows in index_batches)


def in_memory(images, num_workers=0, max_bytes=None):
  """A Source read into a float32 array in [0, 1] if its images take at most max_bytes as
  float32 (None: always); arrays and larger Sources unchanged."""
  if not isinstance(images, Source) or (max_bytes is not None and
                                        np.prod(images.shape) * 4 > max_bytes):
    return images
  read = np.empty(images.shape, np.uint8)
  rows = chunks(len(images), 1024)
  for chunk, batch in zip(rows, stream(images, rows, num_workers)):
    read[chunk] = batch
  return read.astype(np.float32) / 255.0
