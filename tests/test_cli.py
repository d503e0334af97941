"""The command line as a user runs it: python -m experiments.main."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT
from conftest import device_env
from conftest import run_main as main
from experiments import cli


BAD_INPUTS = [
    (['--config.model=resnet'], "config.model='resnet' is not allowed: use one of gaussian, vq"),
    (['--config.method=triple'], "config.method='triple' is not allowed: use one of none, multi"),
    (['--config.data.name=imagenet'], "config.data.name='imagenet' is not allowed"),
    (['--config.mask.sampling=poisson'], "config.mask.sampling='poisson' is not allowed"),
    (['--config.mask.num_pixels=-2'], 'config.mask.num_pixels=-2 is not allowed: use a count from 0'),
    (['--config.mask.num_pixels=65'], 'config.mask.num_pixels=65 is not allowed: use a count from 0 to 64'),
    (['--config.mask.power_law_exponent=0'], 'config.mask.power_law_exponent=0.0 is not allowed'),
    (['--config.mask.power_law_exponent=-3'], 'config.mask.power_law_exponent=-3.0 is not allowed'),
    (['--config.data.name=idx', '--config.data.path=/nonexistent'], "data.path='/nonexistent' is not a folder"),
    (['--config.mask.nokey=1'], 'config key config.mask.nokey does not exist'),
    (['--config.train.num_epochs=two'], 'flag --config.train.num_epochs=two'),
]


@pytest.mark.parametrize('args,message', BAD_INPUTS)
def test_bad_input_exits_with_one_line(args, message, tmp_path):
  result = main('--config=configs/gauss_multi.py', f'--workdir={tmp_path / "run"}', *args)
  assert result.returncode == 2
  assert result.stderr.strip().count('\n') == 0, result.stderr
  assert message in result.stderr
  assert 'Traceback' not in result.stderr


@pytest.mark.parametrize('arg,message', [
    ('configs/gauss_multi.py:digits,3', 'configuration 3 is not allowed for model=gaussian'),
    ('configs/missing.py', 'cannot load the config file'),
])
def test_bad_config_argument_exits_with_one_line(arg, message):
  result = main(f'--config={arg}')
  assert result.returncode == 2
  assert message in result.stderr and result.stderr.strip().count('\n') == 0


def test_corrupt_data_file_is_named(tmp_path):
  (tmp_path / 'train-images-idx3-ubyte').write_bytes(b'not an idx file at all')
  result = main('--config=configs/gauss_base.py:idx', f'--config.data.path={tmp_path}',
                f'--workdir={tmp_path / "run"}')
  assert result.returncode == 2
  assert 'train-images-idx3-ubyte is not an IDX file' in result.stderr
  assert result.stderr.strip().count('\n') == 0


def test_finished_run_of_another_config_is_not_overwritten(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps({'model': 'vq'}))
  (tmp_path / 'metrics.json').write_text('{"loss": 1.0}')
  result = main('--config=configs/gauss_multi.py', f'--workdir={tmp_path}')
  assert result.returncode == 2
  assert 'holds a run of another config' in result.stderr
  assert (tmp_path / 'metrics.json').read_text() == '{"loss": 1.0}'


def test_importing_the_package_sets_nothing_and_the_command_lines_add_the_convolution_flag():
  script = '''
import os
os.environ.pop('XLA_FLAGS', None)
import jax
before = (dict(os.environ), jax.config.jax_compilation_cache_dir)
import mtvae_jax
assert (dict(os.environ), jax.config.jax_compilation_cache_dir) == before
from experiments import cli
cli.configure_jax()
print(os.environ['XLA_FLAGS'])
os.environ['XLA_FLAGS'] = '--xla_cpu_experimental_ynn_fusion_type=reduce'  # the user's choice
cli.configure_jax()
print(os.environ['XLA_FLAGS'])
'''
  result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True,
                          env=device_env(), timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == [cli.CPU_CONVOLUTION_FLAG,
                                        '--xla_cpu_experimental_ynn_fusion_type=reduce']
