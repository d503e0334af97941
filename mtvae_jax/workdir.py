"""A run's work directory: its files, and whether it holds a run of a given config.

  config.json     the resolved config
  history.jsonl   one JSON line per epoch
  metrics.json    the test metrics of a finished run
  checkpoints/    orbax checkpoints (checkpoints.py)

and what the analyses add (curve.json, uncertainty.json, figures/, samples/;
a VQ-VAE run's prior/ is a work directory of its own). Its JSON and text
files are read and written here (read_json, write_json, write_text), the
checkpoints by checkpoints.py, images by figures.py and generate.py.
"""
import json
import pathlib
import shutil

from mtvae_jax import config as config_lib
from mtvae_jax.errors import UserError

CONFIG = 'config.json'
HISTORY = 'history.jsonl'
METRICS = 'metrics.json'
# Config keys that say where and how a run executes, not what it trains.
RUN_PLACE = ('distributed.', 'data.cache_dir', 'data.num_workers')


def read_json(path):
  """The JSON content of `path`."""
  return json.loads(pathlib.Path(path).read_text())


def write_text(path, text):
  """Writes `text` to `path`."""
  pathlib.Path(path).write_text(text)


def write_json(path, data):
  """`data` as indented JSON in `path`."""
  write_text(path, json.dumps(data, indent=2) + '\n')


def differences(first, second, keys=None, ignore=()):
  """Sorted dotted keys at which two configs (ConfigDicts or dicts) differ: among `keys` when
  given, else all but those starting with a prefix in `ignore`."""
  first, second = config_lib.flatten(first), config_lib.flatten(second)
  keys = first.keys() | second.keys() if keys is None else keys
  return sorted(k for k in keys if not k.startswith(ignore) and first.get(k) != second.get(k))


def finished_run(config, workdir):
  """Metrics of a finished run of `config` in `workdir`, or None; refuses another config's run."""
  workdir = pathlib.Path(workdir)
  if not (workdir / CONFIG).exists():
    return None
  changed = differences(read_json(workdir / CONFIG), json.loads(config.to_json_best_effort()),
                        ignore=RUN_PLACE)
  if changed:
    raise UserError(f"workdir '{workdir}' holds a run of another config (differs at "
                    f"{', '.join(changed)}): choose another --workdir")
  if (workdir / METRICS).exists():
    return read_json(workdir / METRICS)
  return None


def init_workdir(config, workdir, resume=False, needed_bytes=0):
  """Creates `workdir` with config.json, or says in one line why it cannot be written.

  Earlier checkpoints are removed unless `resume`. Fails up front when the
  disk has less than `needed_bytes` free.
  """
  workdir = pathlib.Path(workdir)
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    write_text(workdir / CONFIG, config.to_json_best_effort(sort_keys=True, indent=2))
  except OSError as e:
    raise UserError(f"workdir '{workdir}' is not writable: {e.strerror}") from None
  free = shutil.disk_usage(workdir).free
  if free < needed_bytes:
    raise UserError(f"workdir '{workdir}' has {free / 2**20:.0f} MiB free, its checkpoints need "
                    f'about {needed_bytes / 2**20:.0f} MiB: free some space or choose another')
  if not resume:
    shutil.rmtree(workdir / 'checkpoints', ignore_errors=True)


def check_finished(workdir, what='finished run', hint='train it first'):
  """UserError unless `workdir` holds metrics.json (the run in it has finished)."""
  if not (pathlib.Path(workdir) / METRICS).is_file():
    raise UserError(f"workdir '{workdir}' holds no {what} (no {METRICS}): {hint}")


def load_config(workdir):
  """The config of the finished VAE run in `workdir`."""
  check_finished(workdir)
  stored = read_json(pathlib.Path(workdir) / CONFIG)
  # Keys added since the run was written take their defaults.
  config = config_lib.base_config(stored['model'], stored['method'])
  config.update(stored)
  return config


def read_history(workdir):
  """The records of history.jsonl, one a line."""
  lines = (pathlib.Path(workdir) / HISTORY).read_text().splitlines()
  return [json.loads(line) for line in lines if line]


class History:
  """history.jsonl opened for appending at `first_epoch`; the lines of that epoch and later ones,
  which a resumed run redoes, are dropped."""

  def __init__(self, workdir, first_epoch):
    path = pathlib.Path(workdir) / HISTORY
    kept = [record for record in read_history(workdir) if record['epoch'] < first_epoch] if (
        path.exists()) else []
    write_text(path, ''.join(json.dumps(record) + '\n' for record in kept))
    self._file = open(path, 'a')

  def append(self, record):
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self._file.close()
