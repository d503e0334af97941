"""Command line: python -m experiments.report <dir>... [--out=<file.md>].

Merges the crossval.json of several experiments.crossval directories into one
markdown table, one row per directory in the order given; prints it and,
with --out, writes it to that file.
"""
from absl import app
from absl import flags

from experiments import main as cli
import mtvae_jax
from mtvae_jax import crossval

_OUT = flags.DEFINE_string('out', None, 'Markdown file to write the table to.')


def parse_flags(argv):
  """Flags in one line on failure; the rest of argv are the directories."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    cli.fail(str(e).splitlines()[0])
  if len(rest) < 2:
    cli.fail('give one or more directories of experiments.crossval: '
             'python -m experiments.report <dir>... --out=<file.md>')
  return rest


def main(argv):
  try:
    print(crossval.report(argv[1:], _OUT.value), end='')
  except mtvae_jax.UserError as e:
    cli.fail(str(e))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
