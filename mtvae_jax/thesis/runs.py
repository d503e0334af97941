"""The thesis's experiment grid: its rows expanded into runs, their flags checked and recorded,
and each run's status.

A grid (configs/thesis.py) names rows; each row is trained on every fold of
k-fold cross-validation by `python -m experiments.main`, one process per
(row, fold), into <workdir>/<row>/fold_<i>:

  <workdir>/<row>/command.json   experiments.main's flags of the row but the fold and workdir
  <workdir>/<row>/fold_<i>/      the run (config.json, history.jsonl, metrics.json, ...)
  <workdir>/<row>/fold_<i>.log   its terminal output
  <workdir>/report.md, report.json, figures/   the results (mtvae_jax.thesis.report)

A run is done when its metrics.json exists; a started run resumes from its
checkpoints when launched again, so relaunching the pending runs finishes a
grid after any interruption. Runs are launched by mtvae_jax.thesis.executors:
a local pool of processes or a submitit job array.
"""
import fnmatch
import json
import math
import pathlib
import re
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

