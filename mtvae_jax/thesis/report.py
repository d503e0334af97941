"""The report of a thesis grid: its table, a verdict on each of the thesis's claims, loss curves.

Reads the finished folds of each row (<workdir>/<row>/fold_<i>/metrics.json
and history.jsonl, written by experiments.main) and writes:

  report.json   every row's fold metrics with mean and std, each comparison
                and each claim's verdict
  report.md     the thesis's table (its 4.3), the claims and the figures
  figures/      validation loss curves against the baseline (figures 4.2, 4.4-4.6)
"""
import json
import pathlib
from typing import NamedTuple

from matplotlib import ticker
from matplotlib.figure import Figure
import numpy as np

from mtvae_jax.thesis import crossval
from mtvae_jax.thesis import stats
from mtvae_jax.thesis import table as thesis_table
from mtvae_jax import workdir as workdir_lib
from mtvae_jax.models import REGULARIZER

METHOD_NAMES = {'none': '-', 'multi': 'Multi decoder', 'single': 'Single decoder'}
# Test metrics of metrics.json shown in the table when the runs have them: (key, column).
LOSS_COLUMNS = (('recon_loss', 'Reconstruction loss'),
                ('recon_cond_loss', 'Conditioned reconstruction loss'))
DIAGNOSTIC_COLUMNS = (('codebook_perplexity', 'Codebook perplexity'), ('codes_used', 'Codes used'),
                      ('active_units', 'Active units'), ('z_use', 'z use'))

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
  """Part of a claim: metric_b of row b against metric_a of row a, expected sign(b - a) == sign."""
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
    reg = f'{REGULARIZER[model]}_loss'
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
  return {int(path.parent.name.split('_')[1]): workdir_lib.read_json(path)
          for path in sorted(pathlib.Path(row_dir).glob('fold_*/metrics.json'))}


def fold_histories(row_dir, folds):
  """{fold: [history record, ...]} of the given folds of `row_dir`."""
  return {fold: workdir_lib.read_history(pathlib.Path(row_dir) / f'fold_{fold}')
          for fold in folds}


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
    label = f'{name} **collapsed**' if s.get('collapsed_folds') else name
    cells = ([label, crossval.MODEL_NAMES[fields['model']], s['configuration'],
              METHOD_NAMES[fields['method']], parameters_text(fields), size]
             + [_cell(s, k) for k, _ in LOSS_COLUMNS]
             + [_cell(s, f"{REGULARIZER[fields['model']]}_loss")]
             + [_cell(s, k) for k, _ in diagnostics] + [f"{len(s['folds'])}/{num_folds}"])
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


# A fold has collapsed when its latent carries nothing: metric -> the largest collapsed value.
COLLAPSE = {'active_units': 0, 'codes_used': 1}


def collapsed_folds(summary):
  """The folds of a row whose latent collapsed (no active unit, or at most one code used)."""
  return sorted((fold for fold, metrics in summary['folds'].items()
                 if any(metrics.get(k, limit + 1) <= limit for k, limit in COLLAPSE.items())),
                key=int)


def _number(value):
  return '-' if value is None else f'{value:.4g}'


def thesis_markdown(summaries, data_name):
  """Each row beside its line(s) of the thesis's table 4.3, in the thesis's units."""
  lines = ['| Row | Thesis reconstruction | Ours | Ours / thesis | Thesis KL or VQ | Ours '
           '| Ours / thesis |', '|' + ' --- |' * 7]
  for name, s in summaries.items():
    found = s.get('thesis')
    if found is None:
      lines.append(f'| {name} | no counterpart in the thesis\'s table | | | | | |')
      continue
    cells = [name]
    for i in (0, 1):
      cells += [' / '.join(_number(line[i]) for line in found['thesis']), _number(found['ours'][i]),
                ' / '.join(_number(r[i]) for r in found['ratio'])]
    lines.append('| ' + ' | '.join(cells) + ' |')
  pixels = thesis_table.pixels_per_image(data_name)
  return ('\n'.join(lines) + '\n\nUnits as in the thesis: Gaussian VAE, reconstruction as a '
          'per-image sum of squared errors (ours: the per-pixel mean times D = '
          f'{pixels or "unknown"} values per image) and the KL summed over latent dimensions; '
          'VQ-VAE, per-pixel mean squared error and the VQ objective as ours. The thesis does not '
          "name the data set of its table, nor the exponent of a single decoder's row: where it "
          'has two lines for one row, both are given ("a / b"). Its models trained 100 epochs.\n')


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
                             REGULARIZER[model]) for n in names}
      curves = {n: c for n, c in curves.items() if c is not None}
      if not curves:
        continue
      path = workdir / 'figures' / f'{model}{preset}_{method}.png'
      path.parent.mkdir(exist_ok=True)
      save_curves(path, curves, REGULARIZER[model])
      written.append((number, f'{crossval.MODEL_NAMES[model]}, configuration {preset}, '
                      f'{METHOD_NAMES[method].lower()} against the baseline', path))
  return written


def write_report(workdir, rows, num_folds, command='', network_overridden=(), data_name=''):
  """Writes <workdir>/report.json, report.md and figures/ from the finished folds of `rows`.

  network_overridden: the models ('gaussian', 'vq') whose network keys the
  command changed, shown as configuration 'custom'; data_name: the grid's
  data set (for the thesis's units). Returns report.json's content.
  """
  workdir = pathlib.Path(workdir)
  summaries = {name: summarize_row(fields, fold_metrics(workdir / name),
                                   fields['model'] in network_overridden)
               for name, fields in rows.items()}
  for name, s in summaries.items():
    s['collapsed_folds'] = collapsed_folds(s)
    s['thesis'] = (None if s['configuration'] == 'custom' or not s['folds']
                   else thesis_table.comparison(s['fields'], s['mean'], data_name))
  collapsed = [f"{name} (folds {', '.join(s['collapsed_folds'])})"
               for name, s in summaries.items() if s['collapsed_folds']]
  claims, results = judge(
      [c for c in comparisons(rows) if summaries[c.a]['folds'] and summaries[c.b]['folds']],
      summaries)
  figures = write_figures(workdir, summaries)
  report = {'command': command, 'num_folds': num_folds, 'rows': summaries, 'claims': claims,
            'comparisons': results, 'figures': [str(p.relative_to(workdir)) for _, _, p in figures]}
  (workdir / 'report.json').write_text(json.dumps(report, indent=2) + '\n')
  text = ['# Thesis reproduction', '', f'`{command}`' if command else '', '',
          f'Test metrics of each row, mean ± sample std over its finished folds (of {num_folds}).',
          '', table(summaries, num_folds),
          '**Collapsed** (no active unit, or at most one code used): ' + '; '.join(collapsed)
          if collapsed else 'No row collapsed (each fold keeps an active unit or two codes).',
          '', "## Beside the thesis's table 4.3", '', thesis_markdown(summaries, data_name),
          '## Claims', '',
          'Each comparison pairs the two rows fold by fold on the folds both finished (b - a), '
          f'with a paired t-test at the {stats.ALPHA:g} level; a claim holds when all of its '
          'comparisons hold and is contradicted when any is.', '', claims_markdown(claims, results)]
  if figures:
    text += ['## Validation loss curves', '',
             'Each line is the mean over folds, its band ± one standard deviation.', '']
    text += [f'Thesis figure {number}: {title}.\n\n![{title}]({path.relative_to(workdir)})\n'
             for number, title, path in figures]
  (workdir / 'report.md').write_text('\n'.join(text))
  return report
