"""experiments.benchmark's case selection and flag errors (nothing is timed here)."""
import os
import pathlib
import subprocess
import sys

import pytest

import mtvae_jax
from experiments import benchmark

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_cases_cover_both_models_every_method_and_both_shapes():
  names = benchmark.case_names()
  assert len(names) == 16 and 'gaussian1_multi_28x28x1' in names and 'vq2_single_32x32x3' in names
  config, shape = benchmark.parse_case('vq2_single_32x32x3')
  assert (config.model, config.method, config.vq.num_residual_layers, shape) == (
      'vq', 'single', 2, (32, 32, 3))
  assert (config.conditioning, config.train.precision) == ('dense', 'float32')
  assert benchmark.parse_case('vq2_single_32x32x3', 'bfloat16')[0].train.precision == 'bfloat16'


def test_large_image_cases_cover_both_conditionings():
  assert benchmark.select(['64x64x3']) == [
      'gaussian1_multi_64x64x3', 'gaussian1_multi_64x64x3_spatial', 'vq2_multi_64x64x3',
      'vq2_multi_64x64x3_spatial']
  config, shape = benchmark.parse_case('vq2_multi_64x64x3_spatial')
  assert (config.method, config.conditioning, shape) == ('multi', 'spatial', (64, 64, 3))


def test_case_patterns_select_by_substring_or_glob():
  assert benchmark.select(['gaussian1_none']) == ['gaussian1_none_28x28x1', 'gaussian1_none_32x32x3']
  assert benchmark.select(['vq2_*_28x28x1']) == [
      'vq2_none_28x28x1', 'vq2_multi_28x28x1', 'vq2_single_28x28x1']
  with pytest.raises(mtvae_jax.UserError, match='--cases=vq3 matches no case'):
    benchmark.select(['vq3'])


@pytest.mark.parametrize('args,message', [
    (['--steps=0'], '--steps=0 is not allowed'),
    (['--cases=resnet'], '--cases=resnet matches no case'),
    (['--precision=float16'], '--precision=float16 is not allowed: use one of float32, bfloat16'),
])
def test_bad_flags_end_with_one_line_and_status_2(args, message):
  result = subprocess.run([sys.executable, '-m', 'experiments.benchmark', *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1
  assert lines[0].startswith('error: ') and message in lines[0]
