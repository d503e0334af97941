"""Executors of the thesis grid: a local pool of processes and a submitit job array.

Both launch `python -m experiments.main` with a run's flags (mtvae_jax.thesis.runs.Run) and
return the runs that failed. The grid's lock, held while launching, is inherited by the local
pool's children so that a relaunch waits for the runs of a killed command to checkpoint.
"""
import contextlib
import ctypes
import fcntl
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from typing import NamedTuple

from mtvae_jax.errors import UserError
from mtvae_jax.thesis.runs import Run

POLL_SECONDS = 0.5

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
