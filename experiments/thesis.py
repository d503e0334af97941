"""Command line: the thesis's grid, cross-validated, with its table, claims and figures.

python -m experiments.thesis --grid=configs/thesis.py:<data set> --workdir=DIR [--folds=5]
    [--rows=<glob>[,<glob>...]] [--executor=local|slurm] [--parallel=N] [--dry_run]
    [--config.<key>=<value> ...]

Trains each pending (row, fold) of the grid with experiments.main into
DIR/<row>/fold_<i>, then writes DIR/report.md, DIR/report.json and
DIR/figures/. Finished folds are kept and interrupted ones resume, so the
same command finishes a grid after a stop, a kill or a crash. --config.*
overrides apply to every row (e.g. --config.train.num_epochs=3). Mistakes
end the program with one line and exit status 2; failed runs, and finished
runs whose metrics.json is not a mapping of finite numbers (left out of the
report), with one line and status 1.
"""
import shlex
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import cli
import mtvae_jax
from mtvae_jax import families
from mtvae_jax.thesis import executors
from mtvae_jax.thesis import report as thesis_report
from mtvae_jax.thesis import runs as thesis

_GRID = config_flags.DEFINE_config_file(
    'grid', None, 'Grid file and its data set, e.g. configs/thesis.py:fashion_mnist.')
_FOLDS = flags.DEFINE_integer('folds', None, 'Folds k >= 2 of the cross-validation '
                              "(default: the grid's, 5 unless it says otherwise).")
_ROWS = flags.DEFINE_string('rows', '', 'Comma-separated globs of the row names to run '
                            '(default: all), e.g. "gauss1_*,vq1_base".')
_EXECUTOR = flags.DEFINE_enum('executor', 'local', ['local', 'slurm'],
                              'local: child processes on this node; slurm: a submitit job array.')
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'local: runs at a time (one GPU each where the '
                                 'node has several, else a share of the CPU cores each).')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'List the runs and which are done; run nothing.')
_CLUSTER = flags.DEFINE_enum('slurm_cluster', 'slurm', ['slurm', 'local', 'debug'],
                             "slurm: submit to SLURM; local, debug: submitit's executors that run "
                             'the job array on this machine, to try a setup.')
_PARTITION = flags.DEFINE_string('slurm_partition', '',
                                 "SLURM partition (default: the cluster's).")
_TIME = flags.DEFINE_integer('slurm_time', 24 * 60, 'Time limit of each job in minutes.')
_GPUS = flags.DEFINE_integer('slurm_gpus', 1, 'GPUs per job.')
_CPUS = flags.DEFINE_integer('slurm_cpus', 0, 'CPUs per job (0: the cluster\'s default).')
_ARRAY = flags.DEFINE_integer('slurm_array_parallelism', 32, 'Jobs of the array running at once.')


def split_overrides(argv):
  """(the program's own flags, the --config.<key>=<value> overrides for experiments.main)."""
  own, overrides = [], []
  for arg in argv:
    if arg.startswith('--config.'):
      if '=' not in arg:
        cli.fail(f'{arg}: give overrides as --config.<key>=<value>')
      overrides.append(arg)
    elif arg == '--config' or arg.startswith('--config='):
      cli.fail('--config is not a flag of experiments.thesis: the grid sets each row\'s config; '
           'use --grid, and --config.<key>=<value> to override a key in every row')
    else:
      own.append(arg)
  return own, overrides


OVERRIDES = []
_PARSE = cli.flags_parser('experiments.thesis', config=cli.REFUSED,
                          workdir="the folder of the grid: one subfolder per row, and the report")


def parse_flags(argv):
  own, OVERRIDES[:] = split_overrides(argv)
  rest = _PARSE(own)
  if not flags.FLAGS['grid'].present:
    cli.fail('--grid is required, e.g. --grid=configs/thesis.py:digits')
  try:
    _GRID.value.rows  # pylint: disable=pointless-statement  # a bad grid file fails here
  except (AttributeError, KeyError, OSError, ValueError) as e:
    cli.fail(cli.error_line(e, own))
  return rest


def dry_run(commands, runs):
  for name, args in commands.items():
    print(f'{name}: python -m experiments.main {shlex.join(args)}')
  statuses = [thesis.status(run) for run in runs]
  for run, state in zip(runs, statuses):
    print(f'{state:8} {run.name}')
  print(', '.join(f'{statuses.count(s)} {s}' for s in ('done', 'started', 'pending', 'failed')))


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  grid, workdir = _GRID.value, cli.WORKDIR.value
  configs_dir = config_flags.get_config_filename(flags.FLAGS['grid']).rpartition('/')[0] or '.'
  folds = grid.folds if _FOLDS.value is None else _FOLDS.value
  try:
    rows = thesis.select(grid.rows.to_dict(), _ROWS.value)
    presets = {name: [*grid.overrides, *grid.model_overrides.get(fields['model'], ())]
               for name, fields in rows.items()}
    commands, runs = thesis.expand(rows, folds, workdir, configs_dir, grid.data, OVERRIDES,
                                   presets)
    if _PARALLEL.value < 1:
      raise mtvae_jax.UserError(f'--parallel={_PARALLEL.value} is not allowed: use an integer >= 1')
    thesis.validate(commands, folds)
    if _DRY_RUN.value:
      dry_run(commands, runs)
      return
    with executors.locked(workdir) as lock:
      thesis.record(commands, workdir)
      pending = thesis.pending(runs)
      done = [run for run in runs if thesis.status(run) == 'done']
      print(f'{len(done)} of {len(runs)} runs done, {len(pending)} to run')
      if _EXECUTOR.value == 'local':
        failures = executors.run_local(pending, _PARALLEL.value, pass_fds=(lock,))
      else:
        failures = executors.run_submitit(
            pending, workdir, _CLUSTER.value, _PARTITION.value, _TIME.value, _GPUS.value,
            _ARRAY.value, _CPUS.value)
      network = {model for model in families.FAMILIES
                 if any(o.startswith(f'--config.{model}.') for args in commands.values()
                        for o in args)}
      command = shlex.join(['python', '-m', 'experiments.thesis', *sys.argv[1:]])
      report = thesis_report.write_report(workdir, rows, folds, command, network, grid.data)
      print(f'report: {workdir}/report.md')
  except mtvae_jax.UserError as e:
    cli.fail(str(e))
  problems = []
  if failures:
    problems.append(f'{len(failures)} of {len(pending)} runs failed: '
                    + '; '.join(f'{f.run.name} ({f.reason}; log {f.run.log})' for f in failures)
                    + '; rerun the same command to retry them')
  if report['failed']:
    problems.append(f"{len(report['failed'])} finished runs have unusable metrics, left out of "
                    f"the report: {'; '.join(report['failed'])}; remove their folders to train "
                    'them again')
  if problems:
    cli.fail('; '.join(problems), status=1)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
