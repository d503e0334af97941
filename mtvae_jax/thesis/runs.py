"""The thesis's experiment grid: runs, executors, and the report with a verdict on each claim.

A grid (configs/thesis.py) names rows; each row is trained on every fold of
k-fold cross-validation by `python -m experiments.main`, one process per
(row, fold), into <workdir>/<row>/fold_<i>:

  <workdir>/<row>/command.json   experiments.main's flags of the row but the fold and workdir
  <workdir>/<row>/fold_<i>/      the run (config.json, history.jsonl, metrics.json, ...)
  <workdir>/<row>/fold_<i>.log   its terminal output
  <workdir>/report.md, report.json, figures/   the results (mtvae_jax.thesis.report)

A run is done when its metrics.json exists; a started run resumes from its
checkpoints when launched again, so relaunching the pending runs finishes a
grid after any interruption. Runs are launched by a local pool of processes
(`run_local`) or as a submitit job array (`run_submitit`).
"""
import contextlib
import ctypes
import fcntl
import fnmatch
import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import NamedTuple

from absl import flags
from ml_collections import config_flags

from mtvae_jax import config as config_lib
from mtvae_jax import data as data_lib
from mtvae_jax import methods
from mtvae_jax import workdir as workdir_lib
from mtvae_jax.errors import UserError

CONFIG_FILES = {'gaussian': 'gauss', 'vq': 'vq'}
METHOD_FILES = {'none': 'base', 'multi': 'multi', 'single': 'single'}
POLL_SECONDS = 0.5
FOLD_DIR = re.compile(r'fold_(\d+)')  # the folder of fold <i> in a row's; others are not folds


class Run(NamedTuple):
  """Fold `fold` of row `row`: experiments.main's flags `args` (workdir included)."""
  row: str
  fold: int
  workdir: pathlib.Path
  args: tuple

  @property
  def name(self):
    return f'{self.row} fold {self.fold}'

  @property
  def log(self):
    return self.workdir.with_suffix('.log')


def row_arguments(fields, configs_dir, data):
  """experiments.main's --config flags for a row of the grid."""
  config_file = pathlib.Path(configs_dir) / (
      f"{CONFIG_FILES[fields['model']]}_{METHOD_FILES[fields['method']]}.py")
  args = [f"--config={config_file}:{data},{fields['preset']}"]
  if methods.METHODS[fields['method']].conditioned:
    args += [f"--config.mask.sampling={fields['sampling']}",
             f"--config.mask.count={fields['count']}"]
  if fields.get('exponent'):
    args.append(f"--config.mask.power_law_exponent={fields['exponent']}")
  return args + [f"--config.loss.balancing={fields['balancing']}"]


def select(rows, patterns):
  """The rows {name: fields} whose names match one of the comma-separated glob `patterns`."""
  if not patterns:
    return dict(rows)
  globs = [p for p in patterns.split(',') if p]
  for glob in globs:
    if not fnmatch.filter(rows, glob):
      raise UserError(f"--rows pattern '{glob}' matches no row of the grid: its rows are "
                      f"{', '.join(rows)}")
  return {name: fields for name, fields in rows.items()
          if any(fnmatch.fnmatchcase(name, glob) for glob in globs)}


def expand(rows, num_folds, workdir, configs_dir, data, overrides=(), row_overrides=None):
  """({row: its flags but the fold and workdir}, the runs, row by row, fold by fold).

  Each row's flags: its own, then row_overrides[row] (a grid's presets), then `overrides`.
  """
  if num_folds < 2:
    raise UserError(f'--folds={num_folds} is not allowed: use an integer >= 2')
  row_overrides = row_overrides or {}
  commands = {name: [*row_arguments(fields, configs_dir, data), *row_overrides.get(name, ()),
                     *overrides, f'--config.data.num_folds={num_folds}']
              for name, fields in rows.items()}
  runs = [Run(name, fold, pathlib.Path(workdir) / name / f'fold_{fold}',
              (*args, f'--config.data.fold={fold}',
               f'--workdir={pathlib.Path(workdir) / name / f"fold_{fold}"}'))
          for name, args in commands.items() for fold in range(num_folds)]
  return commands, runs


def resolve(args):
  """The config that experiments.main builds from `args`, validated; UserError in one line."""
  values = flags.FlagValues()
  argv = ['experiments.main', *args]
  holder = config_flags.DEFINE_config_file('config', None, 'config', flag_values=values,
                                           sys_argv=argv)
  try:
    values(argv)
    config = holder.value
    config_lib.validate(config)
  except UserError as e:
    raise UserError(f'{e}: {args[0]}') from None
  except (AttributeError, KeyError) as e:  # a key that the config does not have
    words = set(re.findall(r'\w+', str(e)))
    keys = [a.split('=')[0][len('--config.'):] for a in args if a.startswith('--config.')]
    bad = [key for key in keys if words & set(key.split('.'))]
    raise UserError(f"config key {', '.join(bad) or str(e)} does not exist (see the config "
                    f'file for the keys): {args[0]}') from None
  except (flags.Error, ValueError, OSError) as e:
    lines = [line for line in str(e).splitlines() if line.strip()]
    raise UserError(f'{lines[-1] if lines else type(e).__name__}: {args[0]}') from None
  return config


def fold_pool(data_config, seed):
  """How many images the folds of `data_config` are cut from: its data set's images but the
  test split. Reads the data set's index (its images are decoded on demand)."""
  data_config = data_config.copy_and_resolve_references()
  data_config.num_folds = 0
  train, validation, _ = data_lib.DATASETS[data_config.name](data_config, seed)
  return len(train) + len(validation)


def validate(commands, num_folds):
  """Checks every row's config {row: flags}, and that its data has `num_folds` images or more to
  cut into folds, before anything is written; UserError in one line."""
  checked = set()
  for args in commands.values():
    config = resolve(args)
    data_key = (config.data.to_json(), config.seed)
    if data_key in checked:
      continue
    checked.add(data_key)
    pool = fold_pool(config.data, config.seed)
    if num_folds > pool:
      raise UserError(f'--folds={num_folds} is not allowed: data set {config.data.name} leaves '
                      f'{pool} images to cut into folds beside its test split: use 2 to {pool}')


def record(commands, workdir):
  """Refuses rows whose folders hold runs of other flags, and records each row's flags in
  <workdir>/<row>/command.json."""
  for name, args in commands.items():
    row_dir = pathlib.Path(workdir) / name
    recorded = row_dir / 'command.json'
    started = any(row_dir.glob('fold_*/config.json'))
    if started and recorded.exists() and json.loads(recorded.read_text()) != args:
      old = json.loads(recorded.read_text())
      changed = sorted(set(old) ^ set(args))
      raise UserError(f"'{row_dir}' holds runs of other flags (differing: {' '.join(changed)}): "
                      'choose another --workdir, or remove that folder to train the row anew')
    try:
      row_dir.mkdir(parents=True, exist_ok=True)
      recorded.write_text(json.dumps(args, indent=2) + '\n')
    except OSError as e:
      raise UserError(f"--workdir: '{row_dir}' cannot be written: {e.strerror}") from None


def metrics_problem(metrics):
  """Why the content of a run's metrics.json does not make it finished, '' where it does: it must
  map each metric's name to a finite number."""
  if not isinstance(metrics, dict) or not metrics:
    return f'metrics.json holds {json.dumps(metrics)[:40]}, not a mapping of metrics to numbers'
  for name, value in metrics.items():
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      return f'metrics.json holds {name}={json.dumps(value)[:40]}, not a number'
    if not math.isfinite(value):
      return f'metrics.json holds {name}={value}'
  return ''


def status(run):
  """'done' (metrics.json of finite numbers), 'failed' (other metrics.json), 'started' (resumes
  from its checkpoints) or 'pending'."""
  path = run.workdir / 'metrics.json'
  if path.exists():
    return 'failed' if metrics_problem(workdir_lib.read_json(path)) else 'done'
  return 'started' if (run.workdir / 'config.json').exists() else 'pending'


def pending(runs):
  """The runs of `runs` not done yet, fold by fold: each row's first fold, then each one's second...

  A row's first fold compiles its steps into the persistent compilation cache
  and its other folds read them from there; started beside it, they would
  compile the same programs once more each.
  """
  return sorted((run for run in runs if status(run) in ('started', 'pending')),
                key=lambda run: run.fold)


LOCK_WAIT_SECONDS = 120


@contextlib.contextmanager
def locked(workdir, echo=print):
  """Holds <workdir>/.lock while launching runs there; yields its file descriptor.

  The runs that `run_local` starts inherit the descriptor, so the lock lasts
  until the last of them has exited, even when the grid command was killed
  first. A lock held by someone else is waited for up to LOCK_WAIT_SECONDS
  (the runs of a killed command checkpoint and stop within seconds).
  """
  try:
    pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
    lock = open(pathlib.Path(workdir) / '.lock', 'w')
  except OSError as e:
    raise UserError(f"--workdir='{workdir}' cannot be written: {e.strerror}") from None
  with lock:
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
      try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except BlockingIOError:
        if time.monotonic() > deadline:
          raise UserError(f"--workdir='{workdir}' is in use by another grid command or its "
                          'runs: wait for them to end, or stop them first') from None
        if deadline - time.monotonic() > LOCK_WAIT_SECONDS - 1:
          echo(f'waiting for the runs of another grid command in {workdir} to stop')
        time.sleep(1)
    yield lock.fileno()


def _die_with_parent():
  """In a child process: SIGTERM when the grid command dies (Linux), so that an orphaned run
  checkpoints and stops instead of racing a relaunched one."""
  if sys.platform.startswith('linux'):
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def launch(run, env=None, pass_fds=()):
  """Starts experiments.main for `run`, its output appended to run.log; returns the Popen.

  The child keeps the file descriptors `pass_fds` open (the grid's lock).
  """
  run.log.parent.mkdir(parents=True, exist_ok=True)
  with open(run.log, 'a') as log:
    return subprocess.Popen([sys.executable, '-m', 'experiments.main', *run.args], stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            preexec_fn=_die_with_parent, pass_fds=pass_fds)


def visible_gpus():
  """Ids of the node's NVIDIA GPUs: CUDA_VISIBLE_DEVICES where set, else nvidia-smi's list."""
  listed = os.environ.get('CUDA_VISIBLE_DEVICES')
  if listed is not None:
    return [d.strip() for d in listed.split(',') if d.strip()]
  smi = shutil.which('nvidia-smi')
  if not smi:
    return []
  try:
    lines = subprocess.run([smi, '-L'], capture_output=True, text=True, timeout=60).stdout
  except (OSError, subprocess.SubprocessError):
    return []
  return [str(i) for i, line in enumerate(lines.splitlines()) if line.startswith('GPU ')]


def slots(parallel, gpus):
  """The environment changes of each of `parallel` process slots, given the node's `gpus`.

  With several GPUs slot s gets GPU s mod their number; processes that share
  a GPU allocate its memory on demand. On CPUs every process keeps all cores:
  XLA's results depend on its thread count (to float32 rounding), so a run
  gives the same numbers whatever --parallel and executor.
  """
  shared = {'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'} if parallel > max(len(gpus), 1) else {}
  if len(gpus) > 1:
    return [{'CUDA_VISIBLE_DEVICES': gpus[s % len(gpus)], **shared} for s in range(parallel)]
  return [shared if gpus else {} for _ in range(parallel)]


class _Stopped(Exception):
  pass


def _raise_stopped(signum, frame):
  del frame
  raise _Stopped(signal.Signals(signum).name)


def last_line(path):
  """The last non-empty line of a log file, or ''."""
  try:
    lines = [line for line in pathlib.Path(path).read_text(errors='replace').splitlines()
             if line.strip()]
  except OSError:
    return ''
  return lines[-1].strip() if lines else ''


class Failure(NamedTuple):
  run: Run
  reason: str


def run_local(runs, parallel, echo=print, gpus=None, pass_fds=()):
  """Runs `runs` `parallel` at a time as child processes (keeping `pass_fds` open); returns
  the failures.

  A run that fails before it touched its folder (experiments.main checks the
  config and the data first) fails the same way for every run: no further
  run is launched then. On SIGTERM or SIGINT the running children are
  stopped (they checkpoint) and UserError says how to resume.
  """
  gpus = visible_gpus() if gpus is None else gpus
  layout = slots(parallel, gpus)
  pending, active, failures, done = list(runs), {}, [], 0
  previous = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGTERM, signal.SIGINT)}
  try:
    while pending or active:
      while pending and len(active) < parallel:
        slot = min(set(range(parallel)) - set(active))
        run = pending.pop(0)
        active[slot] = (run, launch(run, dict(os.environ, **layout[slot]), pass_fds),
                        time.monotonic())
        echo(f'started {run.name} (log: {run.log})')
      time.sleep(POLL_SECONDS)
      for slot, (run, process, start) in list(active.items()):
        code = process.poll()
        if code is None:
          continue
        del active[slot]
        done += 1
        seconds = time.monotonic() - start
        if code == 0:
          echo(f'[{done}/{len(runs)}] {run.name} done in {seconds:.0f} s')
          continue
        failures.append(Failure(run, last_line(run.log) or f'exit status {code}'))
        echo(f'[{done}/{len(runs)}] {run.name} failed (exit status {code}): {failures[-1].reason}')
        if not (run.workdir / 'config.json').exists():
          pending = []  # config or data refused: every other run would fail alike
  except _Stopped as stop:
    for run, process, _ in active.values():
      process.send_signal(signal.SIGTERM)
    for run, process, _ in active.values():
      process.wait()
    raise UserError(f'stopped by {stop}: {len(active)} running runs checkpointed; rerun the same '
                    'command to finish the grid') from None
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  return failures


def execute(args, log, cwd):
  """A submitit job: experiments.main with `args` in `cwd`, output appended to `log`."""
  with open(log, 'a') as out:
    code = subprocess.run([sys.executable, '-m', 'experiments.main', *args], cwd=cwd, stdout=out,
                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                          preexec_fn=_die_with_parent, check=False).returncode
  if code:
    raise RuntimeError(f'experiments.main exited with status {code}: {last_line(log)}')
  return code


IN_FLIGHT = ('PENDING', 'RUNNING', 'REQUEUED', 'CONFIGURING', 'COMPLETING', 'SUSPENDED', 'READY')


def _jobs_file(workdir):
  return pathlib.Path(workdir) / 'submitit' / 'jobs.json'


def run_submitit(runs, workdir, cluster='slurm', partition='', timeout_min=24 * 60, gpus=1,
                 array_parallelism=32, cpus=0, echo=print):
  """Runs `runs` as one submitit job array and waits for them; returns the failures.

  Job ids are kept in <workdir>/submitit/jobs.json: a rerun waits for the
  jobs of its runs that the cluster still holds instead of submitting them
  again. cluster 'local' runs the array on this machine (submitit's
  LocalExecutor), as a test of the setup.
  """
  import submitit  # pylint: disable=import-outside-toplevel
  folder = pathlib.Path(workdir) / 'submitit'
  executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
  parameters = dict(name='mtvae_thesis', timeout_min=timeout_min, gpus_per_node=gpus,
                    slurm_array_parallelism=array_parallelism)
  if partition:
    parameters['slurm_partition'] = partition
  if cpus:
    parameters['cpus_per_task'] = cpus
  executor.update_parameters(**parameters)
  recorded = json.loads(_jobs_file(workdir).read_text()) if _jobs_file(workdir).exists() else {}
  jobs, to_submit = {}, []
  for run in runs:
    job_id = recorded.get(run.name)
    if job_id and cluster == 'slurm':
      job = submitit.SlurmJob(folder=folder, job_id=job_id)
      job.get_info(mode='force')
      if job.state.upper() in IN_FLIGHT:
        jobs[run] = job
        echo(f'{run.name}: waiting for job {job_id} ({job.state})')
        continue
    to_submit.append(run)
  if to_submit:
    cwd = os.getcwd()
    with executor.batch():
      submitted = [executor.submit(execute, run.args, str(run.log.absolute()), cwd)
                   for run in to_submit]
    for run, job in zip(to_submit, submitted):
      jobs[run] = job
      recorded[run.name] = job.job_id
    _jobs_file(workdir).write_text(json.dumps(recorded, indent=2) + '\n')
    echo(f'submitted {len(to_submit)} runs as jobs {submitted[0].job_id}..., '
         f'logs in {folder}')
  failures = []
  for count, (run, job) in enumerate(jobs.items(), start=1):
    try:
      job.result()
      echo(f'[{count}/{len(jobs)}] {run.name} done')
    except KeyboardInterrupt:
      raise UserError('stopped waiting; the jobs go on: rerun the same command to wait for them '
                      'and write the report') from None
    except Exception as e:  # pylint: disable=broad-except  # a failed job, whatever its cause
      failures.append(Failure(run, last_line(run.log) or str(e).splitlines()[0]))
      echo(f'[{count}/{len(jobs)}] {run.name} failed: {failures[-1].reason}')
  return failures
