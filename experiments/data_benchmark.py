"""The input pipeline's images/s next to the train step's, for one config.

  python -m experiments.data_benchmark --config=configs/gauss_multi.py:celeb_a [--stream] [--decode]

The pipeline reads training batches in the order of epochs 1, 2, ..., float32
on the device, with nothing else running: for an in-memory set a gather on the
device; for a streamed set read from its uint8 cache (data.cache_dir) both
ways `pipeline.to_device` may feed it, gathered from the cache held on the
device and read from the memory-mapped cache file by host threads, and with
--decode (or data.cache_dir=none) decoded from the source by grain workers.
The train step runs on one batch already on the device. --stream streams the
training split whatever its size, as a large set would be.
"""
import functools
import math
import time

from absl import app
from absl import flags
import jax
import numpy as np

from experiments import cli
from mtvae_jax import config as config_lib
from mtvae_jax import data
from mtvae_jax import train
from mtvae_jax.data import pipeline

_BATCHES = flags.DEFINE_integer('batches', 100, 'Batches to time, for each side (epoch 1, 2, ...).',
                               lower_bound=1)
_STREAM = flags.DEFINE_bool('stream', False, 'Stream the training split even if it is small.')
_STEP_BATCHES = flags.DEFINE_integer('step_batches', 0, 'Batches to time the train step on '
                                     '(0: --batches), fewer where it is slow.', lower_bound=0)
_DECODE = flags.DEFINE_bool('decode', False, 'Also time decoding from the source, without cache.')


def images_per_s(batches, batch_size, run_batch):
  """Throughput of run_batch(i) over `batches` calls, after one untimed warm-up call."""
  jax.block_until_ready(run_batch(0))  # compilation, worker start-up
  start = time.perf_counter()
  for i in range(1, batches + 1):
    out = run_batch(i)
  jax.block_until_ready(out)
  return batches * batch_size / (time.perf_counter() - start)


def benchmark(config):
  config_lib.validate(config)
  if _STREAM.value:
    pipeline.IN_MEMORY_BYTES = 0
  run = train.setup(config)
  config = run.config  # resolved for the loaded images
  batch_size, num_batches = config.train.batch_size, _BATCHES.value
  epochs = range(1, math.ceil((num_batches + 1) / (len(run.splits.train) // batch_size)) + 1)
  order = np.concatenate([pipeline.epoch_order(config.seed, epoch, len(run.splits.train),
                                               batch_size) for epoch in epochs])
  rates = {}
  for name, images in feeds(run.splits.train, config).items():
    feed = pipeline.batches(images, order, config.data.num_workers)
    rates[name] = images_per_s(num_batches, batch_size, lambda i, feed=feed: next(feed))
    del feed  # stops the workers

  batch = next(pipeline.batches(pipeline.to_device(run.splits.train), order[:1]))
  train_fn = jax.jit(functools.partial(train.train_step, config=config), donate_argnums=0)
  state = run.state

  def step(i):
    nonlocal state
    state, metrics = train_fn(state, batch, run.train_key)
    return metrics

  step_rate = images_per_s(_STEP_BATCHES.value or num_batches, batch_size, step)
  print(f'{config.model} {config.method} on {config.data.name} {run.splits.train.shape[1:]}, '
        f'batch {batch_size}, {jax.devices()[0].device_kind}: train step {step_rate:,.0f} images/s')
  for name, rate in rates.items():
    print(f'  input pipeline, {name}: {rate:,.0f} images/s = {rate / step_rate:.1f}x the step')


def feeds(train_images, config):
  """{what: training split ready for pipeline.batches}: every way the split can be fed."""
  workers = config.data.num_workers
  if not isinstance(train_images, pipeline.Source):
    return {'in memory, gathered on the device': pipeline.to_device(train_images)}
  if not isinstance(train_images, pipeline.Cached):
    return {f'decoded by {workers} workers': train_images}
  ways = {'cache on the device, gathered there': pipeline.to_device(train_images, math.inf),
          'cache memory-mapped on the host, read by threads': pipeline.to_device(train_images, 0)}
  if _DECODE.value:
    source = data.DATASETS[config.data.name](config.data, config.seed).train
    ways[f'decoded by {workers} workers, no cache'] = source
  return ways


def main(argv):
  del argv
  cli.configure_jax()
  cli.run(benchmark, cli.CONFIG.value)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser('experiments.data_benchmark'))
