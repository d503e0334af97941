"""The input pipeline's images/s next to the train step's, for one config.

  python -m experiments.data_benchmark --config=configs/gauss_multi.py:celeb_a [--stream]

The pipeline reads training batches in the order of epoch 1 (device-resident
gather for in-memory sets, grain workers for streamed ones) with nothing else
running; the train step runs on one batch already on the device. --stream
streams the training split whatever its size, as a large set would be.
"""
import functools
import time

from absl import app
from absl import flags
import jax

from experiments import main
from mtvae_jax import config as config_lib
from mtvae_jax import train
from mtvae_jax.data import pipeline
from mtvae_jax.errors import UserError

_BATCHES = flags.DEFINE_integer('batches', 100, 'Batches to time, for each side.')
_STREAM = flags.DEFINE_bool('stream', False, 'Stream the training split even if it is small.')


def images_per_s(batches, batch_size, run_batch):
  """Throughput of run_batch(i) over `batches` calls, after one untimed warm-up call."""
  jax.block_until_ready(run_batch(0))  # compilation, worker start-up
  start = time.perf_counter()
  for i in range(1, batches + 1):
    out = run_batch(i)
  jax.block_until_ready(out)
  return batches * batch_size / (time.perf_counter() - start)


def benchmark(config, workdir):
  del workdir
  config_lib.validate(config)
  if _STREAM.value:
    pipeline.IN_MEMORY_BYTES = 0
  run = train.setup(config)
  batch_size, num_batches = config.train.batch_size, _BATCHES.value
  steps = len(run.splits.train) // batch_size
  if steps < num_batches + 1:
    raise UserError(f'--batches={num_batches} is not allowed: the training split has '
                               f'{steps} batches of {batch_size}, use at most {steps - 1}')
  order = pipeline.epoch_order(config.seed, 1, len(run.splits.train), batch_size)
  feed = pipeline.batches(pipeline.to_device(run.splits.train), order, config.data.num_workers)
  pipeline_rate = images_per_s(num_batches, batch_size, lambda i: next(feed))
  del feed  # stops the workers

  batch = next(pipeline.batches(pipeline.to_device(run.splits.train), order[:1]))
  train_fn = jax.jit(functools.partial(train.train_step, config=config), donate_argnums=0)
  state = run.state

  def step(i):
    nonlocal state
    state, metrics = train_fn(state, batch, run.train_key)
    return metrics

  step_rate = images_per_s(num_batches, batch_size, step)
  kind = 'streamed' if isinstance(run.splits.train, pipeline.Source) else 'in memory'
  print(f'{config.model} {config.method} on {config.data.name} {run.splits.train.shape[1:]}, '
        f'batch {batch_size}, {jax.devices()[0].device_kind}: '
        f'input pipeline ({kind}, {config.data.num_workers} workers) {pipeline_rate:,.0f} images/s; '
        f'train step {step_rate:,.0f} images/s; pipeline / step = {pipeline_rate / step_rate:.1f}x')


if __name__ == '__main__':
  app.run(lambda argv: main.run(benchmark), flags_parser=main.parse_flags)
