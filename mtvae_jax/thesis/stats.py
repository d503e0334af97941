"""Statistics over cross-validation folds: mean ± std and paired comparisons of two rows.

Two rows trained on the same folds compare fold by fold: the differences
d_i = b_i - a_i are tested with a paired t-test (scipy.stats.ttest_rel), whose
95 % confidence interval for the mean difference goes with it.
"""
import math
from typing import NamedTuple, Optional

import numpy as np
from scipy import stats

ALPHA = 0.05
VERDICTS = ('holds', 'contradicted', 'not significant')


def mean_std(values):
  """(mean, sample standard deviation with ddof=1; 0 for one value) of a sequence of floats."""
  values = np.asarray(values, np.float64)
  return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def aggregate(folds):
  """{'mean': {metric: float}, 'std': {...}} (as `mean_std`) of the metrics that every one of
  `folds`, a sequence of {metric: float}, has; empty for no fold."""
  names = sorted(set.intersection(*(set(fold) for fold in folds))) if folds else []
  pairs = {name: mean_std([fold[name] for fold in folds]) for name in names}
  return {'mean': {name: mean for name, (mean, _) in pairs.items()},
          'std': {name: std for name, (_, std) in pairs.items()}}


def mean_std_text(summary, name):
  """'mean ± std' of metric `name` of an `aggregate`, or '-' where the folds do not have it."""
  if name not in summary['mean']:
    return '-'
  return f"{summary['mean'][name]:.4g} ± {summary['std'][name]:.1e}"


class Comparison(NamedTuple):
  """Paired comparison of b against a over n folds: d = b - a."""
  n: int
  mean_difference: float
  ci_low: float
  ci_high: float
  p_value: Optional[float]  # None with fewer than 2 pairs: no test
  verdict: str


def verdict(mean_difference, p_value, expected_sign):
  """'holds' when the difference is significant at ALPHA with the expected sign (+1 or -1),
  'contradicted' when significant with the other sign, else 'not significant'."""
  if p_value is None or not p_value < ALPHA or mean_difference == 0:
    return 'not significant'
  return 'holds' if math.copysign(1, mean_difference) == expected_sign else 'contradicted'


def paired(a, b, expected_sign):
  """Paired t-test of b - a (sequences of equal length n, one value per fold).

  Returns the mean difference, its 95 % confidence interval (Student's t with
  n - 1 degrees of freedom), the two-sided p-value and the verdict on the
  expectation sign(b - a) == expected_sign. Differences that are all equal
  (no spread) give a zero-width interval, p = 0 when they are not 0 and p = 1
  when they are.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f'paired values need two sequences of one length, got {a.shape} and {b.shape}')
  differences = b - a
  n, mean = len(differences), float(np.mean(differences)) if len(differences) else math.nan
  if n < 2:
    return Comparison(n, mean, math.nan, math.nan, None, 'not significant')
  if np.all(differences == differences[0]):
    p_value = 0.0 if mean != 0 else 1.0
    return Comparison(n, mean, mean, mean, p_value, verdict(mean, p_value, expected_sign))
  result = stats.ttest_rel(b, a)
  interval = result.confidence_interval(1 - ALPHA)
  p_value = float(result.pvalue)
  return Comparison(n, mean, float(interval.low), float(interval.high), p_value,
                    verdict(mean, p_value, expected_sign))


def combined_verdict(verdicts):
  """One verdict for a claim made of several comparisons that must all hold.

  'contradicted' when any comparison is, 'holds' when all do, else
  'not significant' (also for no comparison at all).
  """
  verdicts = list(verdicts)
  if 'contradicted' in verdicts:
    return 'contradicted'
  if verdicts and all(v == 'holds' for v in verdicts):
    return 'holds'
  return 'not significant'
