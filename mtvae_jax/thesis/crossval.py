"""k-fold cross-validation and the thesis's results table (its 4.3).

`cross_validate` trains fold i of k in <workdir>/fold_<i> (data.num_folds=k,
data.fold=i; the test split is the same for every fold), keeps every fold
that has already finished, and writes:
  crossval.json  the config, the table's description of it, each fold's
                 metrics.json and their mean and standard deviation
  crossval.md    the table row: mean ± std over folds of the test metrics
Each fold's metrics are those of its best checkpoint on the common test split;
the held-out fold itself chose that checkpoint, so its loss would be biased low.
"""
import json
import pathlib

import numpy as np

from mtvae_jax import config as config_lib
from mtvae_jax import families
from mtvae_jax import methods
from mtvae_jax import train
from mtvae_jax import workdir as workdir_lib
from mtvae_jax.errors import UserError
from mtvae_jax.thesis import stats

SUMMARY = 'crossval.json'
TABLE = 'crossval.md'
COLUMNS = ('Model', 'Config.', 'Method', 'Parameters', 'Size', 'Reconstruction loss',
           'Conditioned reconstruction loss', 'KL or VQ loss', 'Folds')


def configuration(config):
  """The thesis's configuration number, or 'custom' where the network was changed."""
  family = config[config.model]
  preset = config_lib.PRESETS[config.model].get(config.preset, {})
  same = all(np.array_equal(family[key], value) for key, value in preset.items())
  return str(config.preset) if preset and same else 'custom'


def parameters(config):
  """The 'Parameters' column: loss balancing, how the conditioning pixels are drawn, and
  'spatial m' where the conditioned decoder takes m spatially."""
  if not methods.of(config).conditioned:
    words = []
  elif config.mask.count == 'fixed':
    words = [config.mask.sampling, f'k={config.mask.num_pixels}']
  else:
    words = [config.mask.sampling, f'power law a={config.mask.power_law_exponent:g}']
  if words and config.get('conditioning') == 'spatial':
    words.append('spatial m')
  if config.loss.get('balancing') == 'softadapt':
    words.insert(0, 'SoftAdapt')
  return ', '.join(words) or '-'


def describe(config):
  """The table's first columns for `config`."""
  return {'model': families.FAMILIES[config.model].title, 'configuration': configuration(config),
          'method': methods.of(config).title, 'parameters': parameters(config),
          'regularizer': families.FAMILIES[config.model].regularizer}


def summarize(config, folds):
  """The content of crossval.json for `config` and the metrics of its folds."""
  return {'config': json.loads(config.to_json_best_effort()), 'description': describe(config),
          'folds': list(folds), **stats.aggregate(folds)}


def table_row(summary):
  description = summary['description']
  losses = ('recon_loss', 'recon_cond_loss', f"{description['regularizer']}_loss")
  return (description['model'], description['configuration'], description['method'],
          description['parameters'], f"{summary['mean']['num_params']:,.0f}",
          *(stats.mean_std_text(summary, name) for name in losses), str(len(summary['folds'])))


def markdown_table(summaries):
  """A markdown table with one row per cross-validation summary."""
  lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|' + ' --- |' * len(COLUMNS)]
  lines += ['| ' + ' | '.join(table_row(summary)) + ' |' for summary in summaries]
  return '\n'.join(lines) + '\n'


def load_summary(directory):
  """The crossval.json of `directory`."""
  path = pathlib.Path(directory) / SUMMARY
  if not path.is_file():
    raise UserError(f"'{directory}' holds no {SUMMARY}: run python -m experiments.crossval "
                    f'--config=<config> --workdir={directory} first')
  return workdir_lib.read_json(path)


def cross_validate(config, workdir, num_folds):
  """Trains the unfinished folds, writes crossval.json and crossval.md; returns the summary."""
  if num_folds < 2:
    raise UserError(f'--folds={num_folds} is not allowed: use an integer >= 2')
  workdir = pathlib.Path(workdir)
  config = config.copy_and_resolve_references()
  config.data.num_folds = num_folds
  folds = []
  for index in range(num_folds):
    fold_config = config.copy_and_resolve_references()
    fold_config.data.fold = index
    print(f'fold {index + 1} of {num_folds}', flush=True)
    folds.append(train.train_and_evaluate(fold_config, workdir / f'fold_{index}'))
  # The config as the folds ran it, resolved for the loaded images (config.json of fold 0).
  resolved = workdir_lib.load_config(workdir / 'fold_0')
  resolved.data.fold = config.data.fold
  summary = summarize(resolved, folds)
  workdir_lib.write_json(workdir / SUMMARY, summary)
  workdir_lib.write_text(workdir / TABLE, markdown_table([summary]))
  return summary


def report(directories, out=None):
  """The table of the directories' crossval.json, written to `out` too when given."""
  summaries = [load_summary(d) for d in directories]
  for directory, summary in zip(directories, summaries):
    try:
      table_row(summary)
    except (KeyError, TypeError, ValueError, IndexError) as e:
      raise UserError(f"'{pathlib.Path(directory) / SUMMARY}' is damaged ({type(e).__name__}: "
                      f'{e}): rerun python -m experiments.crossval on {directory} to write it '
                      'again') from None
  table = markdown_table(summaries)
  if out:
    try:
      workdir_lib.write_text(out, table)
    except OSError as e:
      raise UserError(f"--out='{out}' cannot be written: {e.strerror}") from None
  return table
