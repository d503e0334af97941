"""A run's work directory: its files, and whether it holds a run of a given config.

  config.json     the resolved config
  history.jsonl   one JSON line per epoch
  metrics.json    the test metrics of a finished run
  checkpoints/    orbax checkpoints (checkpoints.py)
  .lock           held by the process that trains in the directory; holds its process id

and what the analyses add (curve.json, uncertainty.json, figures/, samples/;
a VQ-VAE run's prior/ is a work directory of its own). Its JSON and text
files are read and written here (read_json, write_json, write_text), the
checkpoints by checkpoints.py, images by figures.py and generate.py.
"""
import contextlib
import fcntl
import json
import os
import pathlib
import shutil
import tempfile

from mtvae_jax import config as config_lib
from mtvae_jax import parallel
from mtvae_jax.errors import UserError

CONFIG = 'config.json'
HISTORY = 'history.jsonl'
METRICS = 'metrics.json'
LOCK = '.lock'
# What a run leaves in its directory besides config.json: with these but no config.json, the
# directory holds something this run must not replace.
RUN_FILES = ('checkpoints', HISTORY, METRICS)
# Config keys that say where and how a run executes, not what it trains.
RUN_PLACE = ('distributed.', 'data.cache_dir', 'data.num_workers')


def read_json(path):
  """The JSON content of `path`; UserError naming the file when it is not JSON (empty, cut short
  or damaged)."""
  try:
    return json.loads(pathlib.Path(path).read_text())
  except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
    raise UserError(f"'{path}' is damaged, not JSON ({type(e).__name__}: {e}): restore it, or "
                    'remove the run and train it again') from None


def umask():
  """The process's umask, read without changing it where Linux shows it (/proc/self/status), else
  by setting and restoring it."""
  with contextlib.suppress(OSError, StopIteration, ValueError):
    with open('/proc/self/status') as status:
      return int(next(line for line in status if line.startswith('Umask:')).split()[1], 8)
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def write_text(path, text):
  """Writes `text` to `path` atomically: a reader (or a run killed meanwhile) sees the old content
  or the new, never a part. The file gets the mode a plain open() would give it (0666 less the
  umask), not the temporary file's 0600."""
  path = pathlib.Path(path)
  with tempfile.NamedTemporaryFile('w', dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp',
                                   delete=False) as f:
    f.write(text)
    f.flush()
    os.fchmod(f.fileno(), 0o666 & ~umask())
    os.fsync(f.fileno())
  os.replace(f.name, path)


@contextlib.contextmanager
def locked(workdir):
  """Holds `workdir`'s lock for the block; UserError at once, naming the holder's process id,
  when another process holds it.

  The lock is an flock on workdir/.lock, which the operating system releases
  when its process ends, however it ends: a lock left by a killed run is
  taken over.
  """
  workdir = pathlib.Path(workdir)
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(workdir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise UserError(f"workdir '{workdir}' is not writable: {e.strerror}") from None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 32, 0).decode(errors='replace').strip() or 'unknown'
      raise UserError(f"workdir '{workdir}' is in use by process {holder}: wait for it to end, "
                      'or choose another --workdir') from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'{os.getpid()}\n'.encode(), 0)
    yield
  finally:
    os.close(fd)


def writer_lock(workdir):
  """locked(workdir) in the process that writes the files (parallel.is_writer, after
  parallel.initialize), nothing in the others."""
  return locked(workdir) if parallel.is_writer() else contextlib.nullcontext()


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
  left = [name for name in RUN_FILES if (workdir / name).exists()]
  if not resume and left:
    raise UserError(f"workdir '{workdir}' holds {', '.join(left)} but no {CONFIG}, so nothing "
                    'says which run they belong to: choose another --workdir, or remove them')
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(workdir).free
    if free < needed_bytes:
      raise UserError(f"workdir '{workdir}' has {free / 2**20:.0f} MiB free, its checkpoints "
                      f'need about {needed_bytes / 2**20:.0f} MiB: free some space or choose '
                      'another')
    write_text(workdir / CONFIG, config.to_json_best_effort(sort_keys=True, indent=2))
  except OSError as e:
    raise UserError(f"workdir '{workdir}' is not writable: {e.strerror}") from None
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
  """The records of history.jsonl, one a line. A last line cut short (its run was killed while
  writing it, and redoes that epoch on resuming) is left out; UserError for other damage."""
  path = pathlib.Path(workdir) / HISTORY
  *lines, last = path.read_text(errors='replace').split('\n')
  records = []
  for number, line in enumerate(lines, 1):
    try:
      records.extend([json.loads(line)] if line else [])
    except ValueError:
      raise UserError(f"'{path}' is damaged at line {number}: restore it, or remove the run "
                      'and train it again') from None
  with contextlib.suppress(ValueError):
    records.extend([json.loads(last)] if last else [])
  return records


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
