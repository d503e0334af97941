"""Data parallelism over every device of every process: one mesh axis, 'data'.

Parameters, optimizer, batch-norm and loss-balancing state are replicated;
each batch is split along its first axis over the devices. The jitted steps
are the one-device programs compiled for that layout, so batch means (the
losses, batch-norm statistics, SoftAdapt's inputs) are over the global
batch, and each image's mask and noise come from its own key, whatever the
device count: N devices with global batch B train the same model as one
device with batch B, up to the order of float32 sums.

Several hosts: `initialize` starts jax.distributed from config.distributed or
the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID;
what is left unset JAX detects on SLURM, Open MPI and similar launchers).
Every process then runs the same program on its own devices; only process 0
writes files (`is_writer`).
"""
import functools
import os

import jax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np

from mtvae_jax.errors import UserError

AXIS = 'data'
ENV = {'coordinator_address': 'JAX_COORDINATOR_ADDRESS', 'num_processes': 'JAX_NUM_PROCESSES',
       'process_id': 'JAX_PROCESS_ID'}


def settings(distributed_config):
  """{coordinator_address, num_processes, process_id}: the config's value, else the
  environment's, else None (unset)."""
  unset = {'coordinator_address': '', 'num_processes': 0, 'process_id': -1}
  values = {}
  for key, variable in ENV.items():
    value = distributed_config[key]
    raw = os.environ.get(variable)
    if value == unset[key] and raw:
      try:
        value = raw if key == 'coordinator_address' else int(raw)
      except ValueError:
        raise UserError(f'environment variable {variable}={raw!r} is not allowed: use an '
                        'integer') from None
    values[key] = None if value == unset[key] else value
  return values


def initialize(distributed_config):
  """Starts jax.distributed when a coordinator or a process count is set; otherwise one process.

  Must run before JAX first touches a device; a second call is a no-op.
  """
  values = settings(distributed_config)
  if values['coordinator_address'] is None and values['num_processes'] is None:
    return
  if jax.distributed.is_initialized():
    return
  try:
    jax.distributed.initialize(**values)
  except (RuntimeError, ValueError, TypeError) as e:
    lines = [line for line in str(e).splitlines() if line.strip()]
    raise UserError(f'jax.distributed could not start with {values}: '
                    f'{lines[0] if lines else type(e).__name__}') from None


@functools.lru_cache(maxsize=None)
def mesh():
  """The 1-D mesh of all devices of all processes, axis AXIS."""
  return jax.sharding.Mesh(np.array(jax.devices()), (AXIS,))


def replicated():
  """The same array on every device."""
  return NamedSharding(mesh(), PartitionSpec())


def initialise(init, key):
  """init(key), a train state, built in jit and replicated on every device.

  Its random initialisers draw with JAX's non-partitionable threefry: XLA:CPU
  compiles the partitionable one's bits (JAX's default) many times slower, 29 s
  against 4 s for the small VQ multidecoder of the tests, and a replicated state
  has no use for bits that shard. The train step keeps JAX's default.
  """
  with jax.threefry_partitionable(False):
    return jax.jit(init, out_shardings=replicated())(key)


def sharded():
  """Split along the first axis (the batch) over the devices."""
  return NamedSharding(mesh(), PartitionSpec(AXIS))


def replicate(tree):
  """A pytree of host arrays, copied to every device (the same values on every process)."""
  return jax.device_put(jax.tree.map(np.asarray, tree), replicated())


def check_batch_size(batch_size, key='train.batch_size'):
  """UserError unless the devices can split `batch_size` evenly."""
  devices = jax.device_count()
  if batch_size % devices:
    raise UserError(f'config.{key}={batch_size} is not allowed: it must split evenly over the '
                    f'{devices} devices, use a multiple of {devices}')


def process_rows(rows):
  """The share of global batches of row indices (..., B) that this process reads: the rows its
  devices hold, in order (a consecutive slice of each batch)."""
  slices = sharded().addressable_devices_indices_map((rows.shape[-1],)).values()
  start = min(s[0].start or 0 for s in slices)
  stop = max(rows.shape[-1] if s[0].stop is None else s[0].stop for s in slices)
  return rows[..., start:stop]


def from_process_batches(local):
  """The global batch, sharded, from each process's share (B / processes, ...)."""
  if jax.process_count() == 1:  # the same array, with less overhead
    return jax.device_put(np.asarray(local), sharded())
  return jax.make_array_from_process_local_data(sharded(), np.asarray(local))


def is_writer():
  """Whether this process writes the run's files (process 0)."""
  return jax.process_index() == 0


def sync(name):
  """Waits until every process gets here (a no-op for one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def any_process(flag):
  """Whether `flag` holds on any process (a collective: every process must call it)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.any(multihost_utils.process_allgather(np.array(flag))))
