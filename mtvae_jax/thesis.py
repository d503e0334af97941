"""The thesis's experiment grid: runs, executors, and the report with a verdict on each claim.

A grid (configs/thesis.py) names rows; each row is trained on every fold of
k-fold cross-validation by `python -m experiments.main`, one process per
(row, fold), into <workdir>/<row>/fold_<i>:

  <workdir>/<row>/command.json   experiments.main's flags of the row (without fold and workdir)
  <workdir>/<row>/fold_<i>/      the run (config.json, history.jsonl, metrics.json, ...)
  <workdir>/<row>/fold_<i>.log   its terminal output
  <workdir>/report.md, report.json, figures/   the results (`write_report`)

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
from matplotlib import ticker
from matplotlib.figure import Figure
from ml_collections import config_flags
import numpy as np

from mtvae_jax import config as config_lib
from mtvae_jax import stats
from mtvae_jax.errors import UserError

CONFIG_FILES = {'gaussian': 'gauss', 'vq': 'vq'}
METHOD_FILES = {'none': 'base', 'multi': 'multi', 'single': 'single'}
MODEL_NAMES = {'gaussian': 'Gaussian VAE', 'vq': 'VQ-VAE'}
METHOD_NAMES = {'none': '-', 'multi': 'Multi decoder', 'single': 'Single decoder'}
REGULARIZERS = {'gaussian': 'kl', 'vq': 'vq'}
# Test metrics of metrics.json shown in the table when the runs have them: (key, column).
LOSS_COLUMNS = (('recon_loss', 'Reconstruction loss'),
                ('recon_cond_loss', 'Conditioned reconstruction loss'))
DIAGNOSTIC_COLUMNS = (('codebook_perplexity', 'Codebook perplexity'), ('codes_used', 'Codes used'),
                      ('active_units', 'Active units'), ('z_use', 'z use'))
POLL_SECONDS = 0.5


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
  if fields['method'] != 'none':
    args += [f"--config.mask.sampling={fields['sampling']}", f"--config.mask.count={fields['count']}"]
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


def expand(rows, num_folds, workdir, configs_dir, data, overrides=()):
  """{row: its flags} and the list of runs, row by row, fold by fold."""
  if num_folds < 2:
    raise UserError(f'--folds={num_folds} is not allowed: use an integer >= 2')
  commands = {name: row_arguments(fields, configs_dir, data) + list(overrides)
              for name, fields in rows.items()}
  runs = [Run(name, fold, pathlib.Path(workdir) / name / f'fold_{fold}',
              (*args, f'--config.data.num_folds={num_folds}', f'--config.data.fold={fold}',
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


def check(commands, workdir):
  """Validates each row's config, refuses rows whose folders hold runs of other flags, and
  records each row's flags in <workdir>/<row>/command.json."""
  for name, args in commands.items():
    resolve(args)
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


def status(run):
  """'done' (metrics.json), 'started' (resumes from its checkpoints) or 'pending'."""
  if (run.workdir / 'metrics.json').exists():
    return 'done'
  return 'started' if (run.workdir / 'config.json').exists() else 'pending'


@contextlib.contextmanager
def locked(workdir):
  """Holds <workdir>/.lock, so that one grid command at a time launches runs there."""
  pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
  with open(pathlib.Path(workdir) / '.lock', 'w') as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise UserError(f"--workdir='{workdir}' is in use by another grid command: wait for it "
                      'to end, or stop it first') from None
    yield


def _die_with_parent():
  """In a child process: SIGTERM when the grid command dies (Linux), so that an orphaned run
  checkpoints and stops instead of racing a relaunched one."""
  if sys.platform.startswith('linux'):
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def launch(run, env=None, cores=None):
  """Starts experiments.main for `run`, its output appended to run.log; returns the Popen."""
  def preexec():
    _die_with_parent()
    if cores:
      os.sched_setaffinity(0, cores)

  run.log.parent.mkdir(parents=True, exist_ok=True)
  with open(run.log, 'a') as log:
    return subprocess.Popen([sys.executable, '-m', 'experiments.main', *run.args], stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            preexec_fn=preexec)


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


def slots(parallel, gpus, cores):
  """(environment changes, CPU cores or None) of each of `parallel` process slots.

  With several GPUs, slot s gets GPU s mod their number (and, when slots
  share a GPU, memory allocated on demand); otherwise, with several slots,
  each is pinned to its own share of the CPU cores, one XLA thread pool each.
  """
  if len(gpus) > 1:
    shared = parallel > len(gpus)
    return [({'CUDA_VISIBLE_DEVICES': gpus[s % len(gpus)],
              **({'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'} if shared else {})}, None)
            for s in range(parallel)]
  if gpus or parallel == 1 or parallel > len(cores):
    return [({'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'} if gpus and parallel > 1 else {}, None)
            for _ in range(parallel)]
  return [({}, set(cores[s::parallel])) for s in range(parallel)]


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


def run_local(runs, parallel, echo=print, gpus=None, cores=None):
  """Runs `runs` `parallel` at a time as child processes; returns the failures.

  A run that fails before it touched its folder (experiments.main checks the
  config and the data first) fails the same way for every run: no further
  run is launched then. On SIGTERM or SIGINT the running children are
  stopped (they checkpoint) and UserError says how to resume.
  """
  gpus = visible_gpus() if gpus is None else gpus
  cores = sorted(os.sched_getaffinity(0)) if cores is None else cores
  layout = slots(parallel, gpus, cores)
  pending, active, failures, done = list(runs), {}, [], 0
  previous = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGTERM, signal.SIGINT)}
  try:
    while pending or active:
      while pending and len(active) < parallel:
        slot = min(set(range(parallel)) - set(active))
        env_changes, slot_cores = layout[slot]
        run = pending.pop(0)
        active[slot] = (run, launch(run, dict(os.environ, **env_changes), slot_cores),
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
      run.log.parent.mkdir(parents=True, exist_ok=True)
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
    except Exception as e:  # pylint: disable=broad-except  # a failed job, whatever its cause
      failures.append(Failure(run, last_line(run.log) or str(e).splitlines()[0]))
      echo(f'[{count}/{len(jobs)}] {run.name} failed: {failures[-1].reason}')
  return failures


# The claims of the thesis's 4.1-4.3 and the comparisons that test them. Each comparison is
# (row a, metric a, row b, metric b, sign): the claim expects sign(b - a) == sign, fold by fold.
CLAIMS = {
    'C1': 'Multi decoder (Gaussian) improves decoder 1\'s reconstruction and raises the KL term',
    'C2': 'The conditioned decoder reconstructs better than decoder 1 (Gaussian and VQ)',
    'C3': 'Multi decoder (VQ) improves reconstruction and the VQ loss',
    'C4': 'Single decoder (Gaussian) lowers the KL term and slightly worsens reconstruction',
    'C5': 'Single decoder (VQ) lowers the VQ loss',
    'C6': 'A higher power-law exponent gives better unconditioned reconstruction',
}


class Comparison(NamedTuple):
  claim: str
  a: str
  metric_a: str
  b: str
  metric_b: str
  sign: int


def _baseline(rows, fields):
  """The name of the row of method 'none' of the same model and configuration, or None."""
  for name, other in rows.items():
    if (other['model'], other['preset'], other['method']) == (
        fields['model'], fields['preset'], 'none'):
      return name
  return None


def comparisons(rows):
  """The comparisons that the rows {name: fields} of a grid allow, claim by claim."""
  found = []
  for name, fields in rows.items():
    model, method, base = fields['model'], fields['method'], _baseline(rows, fields)
    reg = f'{REGULARIZERS[model]}_loss'
    if method == 'multi':
      found.append(Comparison('C2', name, 'recon_loss', name, 'recon_cond_loss', -1))
    if base is None or method == 'none':
      continue
    if (model, method) == ('gaussian', 'multi'):
      found += [Comparison('C1', base, 'recon_loss', name, 'recon_loss', -1),
                Comparison('C1', base, reg, name, reg, +1)]
    elif (model, method) == ('vq', 'multi'):
      found += [Comparison('C3', base, 'recon_loss', name, 'recon_loss', -1),
                Comparison('C3', base, reg, name, reg, -1)]
    elif (model, method) == ('gaussian', 'single'):
      found += [Comparison('C4', base, reg, name, reg, -1),
                Comparison('C4', base, 'recon_loss', name, 'recon_loss', +1)]
    else:
      found.append(Comparison('C5', base, reg, name, reg, -1))
  for name, fields in rows.items():
    for other, other_fields in rows.items():
      same = all(fields[k] == other_fields[k] for k in fields if k != 'exponent')
      if (same and fields['method'] == 'single'
          and fields['exponent'] < other_fields['exponent']):
        found.append(Comparison('C6', name, 'recon_loss', other, 'recon_loss', -1))
  return sorted(found, key=lambda c: (c.claim, c.b, c.metric_b, c.a))


def fold_metrics(row_dir):
  """{fold index: metrics.json} of the finished folds in `row_dir`."""
  return {int(path.parent.name.split('_')[1]): json.loads(path.read_text())
          for path in sorted(pathlib.Path(row_dir).glob('fold_*/metrics.json'))}


def fold_histories(row_dir, folds):
  """{fold: [history record, ...]} of the given folds of `row_dir`."""
  return {fold: [json.loads(line) for line in
                 (pathlib.Path(row_dir) / f'fold_{fold}' / 'history.jsonl').read_text().splitlines()
                 if line.strip()] for fold in folds}


def parameters_text(fields):
  """The table's 'Parameters' column: SoftAdapt and how the conditioning pixels are drawn."""
  words = []
  if fields['method'] != 'none':
    words = [fields['sampling'],
             'fixed k' if fields['count'] == 'fixed' else f"power law a={fields['exponent']}"]
  if fields['balancing'] == 'softadapt':
    words.insert(0, 'SoftAdapt')
  return ', '.join(words) or '-'


def summarize_row(fields, folds, custom_network=False):
  """Mean and std over folds of every metric the row's folds all have."""
  names = sorted(set.intersection(*(set(m) for m in folds.values()))) if folds else []
  pairs = {name: stats.mean_std([m[name] for m in folds.values()]) for name in names}
  return {'fields': dict(fields), 'folds': {str(k): v for k, v in folds.items()},
          'configuration': 'custom' if custom_network else str(fields['preset']),
          'mean': {k: v[0] for k, v in pairs.items()}, 'std': {k: v[1] for k, v in pairs.items()}}


def _cell(summary, name):
  if name not in summary['mean']:
    return '-'
  return f"{summary['mean'][name]:.4g} ± {summary['std'][name]:.1e}"


def table(summaries, num_folds):
  """The thesis's table (its 4.3) in markdown: one line per row, mean ± std over folds."""
  diagnostics = [(k, title) for k, title in DIAGNOSTIC_COLUMNS
                 if any(k in s['mean'] for s in summaries.values())]
  columns = (['Row', 'Model', 'Config.', 'Method', 'Parameters', 'Size']
             + [title for _, title in LOSS_COLUMNS] + ['KL or VQ loss']
             + [title for _, title in diagnostics] + ['Folds'])
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + ' --- |' * len(columns)]
  for name, s in summaries.items():
    fields = s['fields']
    size = f"{s['mean']['num_params']:,.0f}" if 'num_params' in s['mean'] else '-'
    cells = ([name, MODEL_NAMES[fields['model']], s['configuration'],
              METHOD_NAMES[fields['method']], parameters_text(fields), size]
             + [_cell(s, k) for k, _ in LOSS_COLUMNS]
             + [_cell(s, f"{REGULARIZERS[fields['model']]}_loss")]
             + [_cell(s, k) for k, _ in diagnostics] + [f"{len(s['folds'])}/{num_folds}"])
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def judge(comparison_list, summaries):
  """Each comparison tested over the folds both of its rows finished, and a verdict per claim."""
  results = []
  for c in comparison_list:
    a_folds, b_folds = summaries[c.a]['folds'], summaries[c.b]['folds']
    folds = sorted(set(a_folds) & set(b_folds), key=int)
    a = [a_folds[f][c.metric_a] for f in folds if c.metric_a in a_folds[f]]
    b = [b_folds[f][c.metric_b] for f in folds if c.metric_b in b_folds[f]]
    if len(a) != len(b):
      a = b = []
    results.append(dict(c._asdict(), folds=[int(f) for f in folds][:len(a)],
                        **stats.paired(a, b, c.sign)._asdict()))
  claims = []
  for claim, statement in CLAIMS.items():
    parts = [r for r in results if r['claim'] == claim]
    counts = {v: sum(r['verdict'] == v for r in parts) for v in stats.VERDICTS}
    claims.append({'claim': claim, 'statement': statement,
                   'verdict': stats.combined_verdict(r['verdict'] for r in parts) if parts
                   else 'not tested', 'comparisons': len(parts), **counts})
  return claims, results


def _side(name, metric):
  return f'{name} {metric}'


def claims_markdown(claims, results):
  lines = ['| Claim | Statement | Verdict | Comparisons: holds / contradicted / not significant |',
           '| --- | --- | --- | --- |']
  lines += [f"| {c['claim']} | {c['statement']} | **{c['verdict']}** | {c['comparisons']}: "
            f"{c['holds']} / {c['contradicted']} / {c['not significant']} |" for c in claims]
  lines += ['', '| Claim | a | b | Expected | n | Mean of b - a | 95 % CI | p | Verdict |',
            '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  for r in results:
    p = '-' if r['p_value'] is None else f"{r['p_value']:.3g}"
    lines.append(f"| {r['claim']} | {_side(r['a'], r['metric_a'])} | {_side(r['b'], r['metric_b'])}"
                 f" | b {'<' if r['sign'] < 0 else '>'} a | {r['n']} | {r['mean_difference']:.3g}"
                 f" | [{r['ci_low']:.3g}, {r['ci_high']:.3g}] | {p} | {r['verdict']} |")
  return '\n'.join(lines) + '\n'


# The thesis's loss-curve figures: 4.2 (Gaussian, multi), 4.4 (VQ, multi), 4.5 (Gaussian,
# single) and 4.6 (VQ, single), each against the baseline of the same configuration.
FIGURES = {('gaussian', 'multi'): '4.2', ('vq', 'multi'): '4.4', ('gaussian', 'single'): '4.5',
           ('vq', 'single'): '4.6'}


def save_curves(path, curves, regularizer):
  """Validation losses per epoch, mean over folds with a band of ± one std, of each row.

  curves: {label: {'epoch': (E,), metric: (folds, E)}}. Left: the KL or VQ
  term; right: decoder 1's reconstruction loss.
  """
  fig = Figure(figsize=(10, 3.8), layout='constrained')
  axes = fig.subplots(1, 2)
  for ax, metric, title in ((axes[0], f'val/{regularizer}_loss', f'{regularizer.upper()} loss'),
                            (axes[1], 'val/recon_loss', 'reconstruction loss, decoder 1')):
    for label, curve in curves.items():
      values = curve[metric]
      mean, std = values.mean(0), values.std(0, ddof=1) if len(values) > 1 else 0 * values[0]
      line, = ax.plot(curve['epoch'], mean, label=label, marker='.' if len(mean) <= 30 else None)
      ax.fill_between(curve['epoch'], mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set(title=f'validation {title}', xlabel='epoch', yscale='log')
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.legend(fontsize=7)
  fig.savefig(path, dpi=100)


def curves_of(row_dir, folds, regularizer):
  """{'epoch': (E,), metric: (folds, E)} over the epochs every fold has, or None."""
  histories = fold_histories(row_dir, folds)
  metrics = ('val/recon_loss', f'val/{regularizer}_loss')
  epochs = sorted(set.intersection(*({r['epoch'] for r in h if all(m in r for m in metrics)}
                                     for h in histories.values())))
  if not epochs:
    return None
  by_epoch = [{r['epoch']: r for r in h} for h in histories.values()]
  return {'epoch': np.array(epochs),
          **{m: np.array([[h[e][m] for e in epochs] for h in by_epoch]) for m in metrics}}


def write_figures(workdir, summaries):
  """One PNG per model, configuration and method against its baseline; returns the paths."""
  workdir = pathlib.Path(workdir)
  written = []
  for (model, method), number in FIGURES.items():
    for preset in sorted({s['fields']['preset'] for s in summaries.values()
                          if s['fields']['model'] == model}):
      names = [n for n, s in summaries.items() if s['folds']
               and (s['fields']['model'], s['fields']['preset']) == (model, preset)
               and s['fields']['method'] in ('none', method)]
      if not any(summaries[n]['fields']['method'] == method for n in names):
        continue
      curves = {n: curves_of(workdir / n, [int(f) for f in summaries[n]['folds']],
                             REGULARIZERS[model]) for n in names}
      curves = {n: c for n, c in curves.items() if c is not None}
      if not curves:
        continue
      path = workdir / 'figures' / f'{CONFIG_FILES[model]}{preset}_{method}.png'
      path.parent.mkdir(exist_ok=True)
      save_curves(path, curves, REGULARIZERS[model])
      written.append((number, f'{MODEL_NAMES[model]}, configuration {preset}, '
                      f'{METHOD_NAMES[method].lower()} against the baseline', path))
  return written


def write_report(workdir, rows, num_folds, command='', network_overridden=()):
  """Writes <workdir>/report.json, report.md and figures/ from the finished folds of `rows`.

  network_overridden: the models ('gaussian', 'vq') whose network keys the
  command changed, shown as configuration 'custom'. Returns report.json's content.
  """
  workdir = pathlib.Path(workdir)
  summaries = {name: summarize_row(fields, fold_metrics(workdir / name),
                                   fields['model'] in network_overridden)
               for name, fields in rows.items()}
  claims, results = judge(
      [c for c in comparisons(rows) if summaries[c.a]['folds'] and summaries[c.b]['folds']],
      summaries)
  figures = write_figures(workdir, summaries)
  report = {'command': command, 'num_folds': num_folds, 'rows': summaries, 'claims': claims,
            'comparisons': results, 'figures': [str(p.relative_to(workdir)) for _, _, p in figures]}
  (workdir / 'report.json').write_text(json.dumps(report, indent=2) + '\n')
  text = ['# Thesis reproduction', '', f'`{command}`' if command else '', '',
          f'Test metrics of each row, mean ± sample std over its finished folds (of {num_folds}).',
          '', table(summaries, num_folds), '## Claims', '',
          'Each comparison pairs the two rows fold by fold on the folds both finished (b - a), '
          f'with a paired t-test at the {stats.ALPHA:g} level; a claim holds when all of its '
          'comparisons hold and is contradicted when any is.', '', claims_markdown(claims, results)]
  if figures:
    text += ['## Validation loss curves', '']
    text += [f'Thesis figure {number}: {title}.\n\n![{title}]({path.relative_to(workdir)})\n'
             for number, title, path in figures]
  (workdir / 'report.md').write_text('\n'.join(text))
  return report
