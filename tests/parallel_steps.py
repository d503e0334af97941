"""Runs a few train steps of a small config and saves losses and parameters (a subprocess of
tests/test_parallel.py, which sets the device count through XLA_FLAGS and, for several
processes, JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID).

  python tests/parallel_steps.py <model> <method> <balancing> <steps> <out.npz> [<image folder>]

With an image folder the training split is streamed from its files (no cache), each process
decoding its own share of every batch; without, it is the digits set, gathered on the devices.
"""
import sys

import jax
import numpy as np

from conftest import small_config
from mtvae_jax import train
from mtvae_jax.data import pipeline


def main(model, method, balancing, steps, out, folder=None):
  config = small_config(model, method)
  config.loss.balancing = balancing
  config.loss.softadapt.update_every = 2
  if folder:
    config.data.update(name='images', path=folder, cache_dir='none', num_workers=0)
    pipeline.IN_MEMORY_BYTES = 0
  run = train.setup(config)
  assert isinstance(run.splits.train, pipeline.Source) == bool(folder)
  step = jax.jit(lambda s, x, k: train.train_step(s, x, k, config=config))
  order = pipeline.epoch_order(config.seed, 1, len(run.splits.train), config.train.batch_size)
  state, losses = run.state, []
  for batch in pipeline.batches(pipeline.to_device(run.splits.train), order[:int(steps)]):
    assert len(batch.sharding.device_set) == jax.device_count()
    state, metrics = step(state, batch, run.train_key)
    losses.append(jax.device_get(metrics))
  leaves = jax.tree_util.tree_leaves_with_path(
      jax.device_get({'params': state.params, 'batch_stats': state.batch_stats,
                      'weights': state.balancing.weights}))
  if jax.process_index() == 0:
    np.savez(out, **{jax.tree_util.keystr(path): leaf for path, leaf in leaves},
             **{f'loss_{i}/{name}': value for i, m in enumerate(losses)
                for name, value in m.items()})


if __name__ == '__main__':
  main(*sys.argv[1:])
