"""Property test: any invalid override ends the command line with one line and exit status 2."""
import string
import subprocess
import sys

from absl import flags
from hypothesis import HealthCheck, given, settings, strategies as st
import pytest

from conftest import ROOT
from experiments import cli
import mtvae_jax

NAMES = {
    'model': ('gaussian', 'vq'),
    'method': ('none', 'multi', 'single'),
    'data.name': ('digits', 'idx'),
    'mask.sampling': ('exact', 'uniform', 'gaussian'),
    'mask.count': ('fixed', 'power_law'),
}
POSITIVE = ['mask.power_law_exponent', 'mask.gaussian_std', 'train.learning_rate']
AT_LEAST_ONE = ['train.num_epochs', 'train.batch_size', 'gaussian.latent_dim']
NON_NEGATIVE = ['loss.weights.recon', 'loss.weights.recon_cond', 'loss.weights.kl',
                'train.weight_decay']
INTEGER = ['mask.num_pixels', 'train.num_epochs', 'train.batch_size', 'seed']

word = st.text(string.ascii_lowercase + '_', min_size=1, max_size=12)
bad_name = st.sampled_from(sorted(NAMES)).flatmap(
    lambda key: word.filter(lambda v: v not in NAMES[key]).map(lambda v: (key, v)))
bad_positive = st.tuples(st.sampled_from(POSITIVE),
                         st.floats(max_value=0, allow_nan=False, allow_infinity=False).map(repr))
bad_count = st.tuples(st.sampled_from(AT_LEAST_ONE), st.integers(max_value=0).map(str))
bad_negative = st.tuples(st.sampled_from(NON_NEGATIVE),
                         st.floats(max_value=-0.5, allow_nan=False, allow_infinity=False).map(repr))
bad_pixels = st.one_of(st.integers(max_value=-2), st.integers(min_value=65)).map(
    lambda k: ('mask.num_pixels', str(k)))
too_large_batch = st.integers(min_value=1456).map(lambda b: ('train.batch_size', str(b)))
not_a_number = st.tuples(st.sampled_from(INTEGER), word)
unknown_key = st.tuples(st.sampled_from(['', 'mask.', 'train.', 'data.']).flatmap(
    lambda prefix: word.filter(lambda w: w not in ('model', 'method', 'seed', 'preset'))
    .map(lambda w: prefix + 'x' + w)), st.just('1'))
invalid_override = st.one_of(bad_name, bad_positive, bad_count, bad_negative, bad_pixels,
                             too_large_batch, not_a_number, unknown_key)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(override=invalid_override)
def test_invalid_override_exits_with_one_line(override, capsys, tmp_path):
  key, value = override
  argv = ['main', '--config=configs/gauss_multi.py', f'--workdir={tmp_path / "run"}',
          f'--config.{key}={value}']
  flags.FLAGS.unparse_flags()
  with pytest.raises(SystemExit) as exit_info:
    cli.flags_parser('experiments.main')(argv)
    cli.run(mtvae_jax.train_and_evaluate, cli.CONFIG.value, cli.workdir())
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('error: ') and '\n' not in err, err
  # nothing written for a refused config; the lock, taken before the data are loaded, may be left
  run = tmp_path / 'run'
  assert not run.exists() or [path.name for path in run.iterdir()] == ['.lock']


def test_a_config_is_validated_without_importing_the_models():
  """Checking a config (as a grid checks each row's) loads no flax module: families.py has the
  names it needs."""
  code = ('import sys; from mtvae_jax import config; '
          "config.validate(config.base_config('vq', 'single', 'digits')); "
          "print(sorted(m for m in sys.modules if m.startswith('mtvae_jax.models')))")
  result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=True)
  assert result.stdout.strip() == '[]'
