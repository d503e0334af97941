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

from mtvae_jax import families
from mtvae_jax import figures
from mtvae_jax import methods
from mtvae_jax import workdir as workdir_lib
from mtvae_jax.thesis import runs
from mtvae_jax.thesis import stats
from mtvae_jax.thesis import table as thesis_table

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


# The method of the rows that the others are compared with.
BASELINE = 'none'
# What a row of (model, method) claims against the baseline of its model and configuration:
# (claim, metric, expected sign(row - baseline)).
AGAINST_BASELINE = {
    ('gaussian', 'multi'): (('C1', 'recon_loss', -1), ('C1', 'kl_loss', +1)),
    ('vq', 'multi'): (('C3', 'recon_loss', -1), ('C3', 'vq_loss', -1)),
    ('gaussian', 'single'): (('C4', 'kl_loss', -1), ('C4', 'recon_loss', +1)),
    ('vq', 'single'): (('C5', 'vq_loss', -1),),
}
# What a row claims within itself: (claim, metric a, metric b, expected sign(b - a)), by method.
WITHIN_ROW = {'multi': (('C2', 'recon_loss', 'recon_cond_loss', -1),)}
# A single decoder's row at a higher power-law exponent against the same row at a lower one.
EXPONENT_CLAIM = ('C6', 'recon_loss', -1)


class Comparison(NamedTuple):
  """Part of a claim: metric_b of row b against metric_a of row a, expected sign(b - a) == sign."""
  claim: str
  a: str
  metric_a: str
  b: str
  metric_b: str
  sign: int


def _baseline(rows, fields):
  """The name of the BASELINE row of the same model and configuration, or None."""
  for name, other in rows.items():
    if (other['model'], other['preset'], other['method']) == (
        fields['model'], fields['preset'], BASELINE):
      return name
  return None


def comparisons(rows):
  """The comparisons that the rows {name: fields} of a grid allow, claim by claim."""
  found = []
  for name, fields in rows.items():
    found += [Comparison(claim, name, metric_a, name, metric_b, sign)
              for claim, metric_a, metric_b, sign in WITHIN_ROW.get(fields['method'], ())]
    base = _baseline(rows, fields)
    if base is None:
      continue
    found += [Comparison(claim, base, metric, name, metric, sign) for claim, metric, sign
              in AGAINST_BASELINE.get((fields['model'], fields['method']), ())]
  claim, metric, sign = EXPONENT_CLAIM
  for name, fields in rows.items():
    for other, other_fields in rows.items():
      same = all(fields[k] == other_fields[k] for k in fields if k != 'exponent')
      if same and fields['exponent'] and fields['exponent'] < (other_fields['exponent'] or 0):
        found.append(Comparison(claim, name, metric, other, metric, sign))
  return sorted(found, key=lambda c: (c.claim, c.b, c.metric_b, c.a))


def fold_metrics(row_dir):
  """({fold index: metrics.json} of the finished folds in `row_dir`, {fold index: why} of those
  whose metrics.json is not a mapping of finite numbers (runs.metrics_problem)).

  A fold is a folder fold_<i>; other folders are not read.
  """
  finished, failed = {}, {}
  for path in sorted(pathlib.Path(row_dir).glob('fold_*/metrics.json')):
    match = runs.FOLD_DIR.fullmatch(path.parent.name)
    if match:
      metrics = workdir_lib.read_json(path)
      problem = runs.metrics_problem(metrics)
      if problem:
        failed[int(match.group(1))] = problem
      else:
        finished[int(match.group(1))] = metrics
  return finished, failed


def fold_histories(row_dir, folds):
  """{fold: [history record, ...]} of the given folds of `row_dir`."""
  return {fold: workdir_lib.read_history(pathlib.Path(row_dir) / f'fold_{fold}')
          for fold in folds}


def parameters_text(fields):
  """The table's 'Parameters' column: SoftAdapt and how the conditioning pixels are drawn."""
  words = []
  if methods.METHODS[fields['method']].conditioned:
    words = [fields['sampling'],
             'fixed k' if fields['count'] == 'fixed' else f"power law a={fields['exponent']}"]
  if fields['balancing'] == 'softadapt':
    words.insert(0, 'SoftAdapt')
  return ', '.join(words) or '-'


def summarize_row(fields, folds, failed, custom_network=False):
  """Mean and std over the finished `folds` {fold: metrics} of every metric they all have;
  `failed` {fold: why} are named only."""
  return {'fields': dict(fields), 'folds': {str(k): v for k, v in folds.items()},
          'failed_folds': {str(k): why for k, why in failed.items()},
          'configuration': 'custom' if custom_network else str(fields['preset']),
          **stats.aggregate(list(folds.values()))}


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
    cells = ([label, families.FAMILIES[fields['model']].title, s['configuration'],
              methods.METHODS[fields['method']].title, parameters_text(fields), size]
             + [stats.mean_std_text(s, k) for k, _ in LOSS_COLUMNS]
             + [stats.mean_std_text(s, families.regularizer_metric(fields['model']))]
             + [stats.mean_std_text(s, k) for k, _ in diagnostics]
             + [f"{len(s['folds'])}/{num_folds}"])
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


def write_figures(workdir, summaries):
  """One PNG per model, configuration and method against its baseline; returns the paths."""
  workdir = pathlib.Path(workdir)
  written = []
  for (model, method), number in FIGURES.items():
    for preset in sorted({s['fields']['preset'] for s in summaries.values()
                          if s['fields']['model'] == model}):
      names = [n for n, s in summaries.items() if s['folds']
               and (s['fields']['model'], s['fields']['preset']) == (model, preset)
               and s['fields']['method'] in (BASELINE, method)]
      if not any(summaries[n]['fields']['method'] == method for n in names):
        continue
      regularizer = families.FAMILIES[model].regularizer
      histories = {n: list(fold_histories(workdir / n, map(int, summaries[n]['folds'])).values())
                   for n in names}
      if all(figures.loss_curves(h, figures.loss_metrics(regularizer)) is None
             for h in histories.values()):
        continue
      path = workdir / 'figures' / f'{model}{preset}_{method}.png'
      path.parent.mkdir(exist_ok=True)
      figures.save_loss_curves(path, histories, regularizer)
      written.append((number, f'{families.FAMILIES[model].title}, configuration {preset}, '
                      f'{methods.METHODS[method].title.lower()} against the baseline', path))
  return written


def write_report(workdir, rows, num_folds, command='', network_overridden=(), data_name=''):
  """Writes <workdir>/report.json, report.md and figures/ from the finished folds of `rows`.

  network_overridden: the models ('gaussian', 'vq') whose network keys the
  command changed, shown as configuration 'custom'; data_name: the grid's
  data set (for the thesis's units). Returns report.json's content.
  """
  workdir = pathlib.Path(workdir)
  summaries = {name: summarize_row(fields, *fold_metrics(workdir / name),
                                   fields['model'] in network_overridden)
               for name, fields in rows.items()}
  failed = [f'{name} fold {fold} ({why})' for name, s in summaries.items()
            for fold, why in s['failed_folds'].items()]
  for name, s in summaries.items():
    s['collapsed_folds'] = collapsed_folds(s)
    s['thesis'] = (None if s['configuration'] == 'custom' or not s['folds']
                   else thesis_table.comparison(s['fields'], s['mean'], data_name))
  collapsed = [f"{name} (folds {', '.join(s['collapsed_folds'])})"
               for name, s in summaries.items() if s['collapsed_folds']]
  claims, results = judge(
      [c for c in comparisons(rows) if summaries[c.a]['folds'] and summaries[c.b]['folds']],
      summaries)
  drawn = write_figures(workdir, summaries)
  report = {'command': command, 'num_folds': num_folds, 'rows': summaries, 'failed': failed,
            'claims': claims, 'comparisons': results,
            'figures': [str(p.relative_to(workdir)) for _, _, p in drawn]}
  (workdir / 'report.json').write_text(json.dumps(report, indent=2) + '\n')
  text = ['# Thesis reproduction', '', f'`{command}`' if command else '', '',
          f'Test metrics of each row, mean ± sample std over its finished folds (of {num_folds}).',
          '', table(summaries, num_folds),
          '**Failed folds**, left out of the means and the tests (remove a fold\'s folder to '
          'train it again): ' + '; '.join(failed) + '\n' if failed else '',
          '**Collapsed** (no active unit, or at most one code used): ' + '; '.join(collapsed)
          if collapsed else 'No row collapsed (each fold keeps an active unit or two codes).',
          '', "## Beside the thesis's table 4.3", '', thesis_markdown(summaries, data_name),
          '## Claims', '',
          'Each comparison pairs the two rows fold by fold on the folds both finished (b - a), '
          f'with a paired t-test at the {stats.ALPHA:g} level; a claim holds when all of its '
          'comparisons hold and is contradicted when any is.', '', claims_markdown(claims, results)]
  if drawn:
    text += ['## Validation loss curves', '',
             'Each line is the mean over folds, its band ± one standard deviation.', '']
    text += [f'Thesis figure {number}: {title}.\n\n![{title}]({path.relative_to(workdir)})\n'
             for number, title, path in drawn]
  (workdir / 'report.md').write_text('\n'.join(text))
  return report
