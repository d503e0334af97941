"""Command line: python -m experiments.report <dir>... [--out=<file.md>].

Merges the crossval.json of several experiments.crossval directories into one
markdown table, one row per directory in the order given; prints it and,
with --out, writes it to that file. Mistakes end with one line and exit
status 2 (experiments/cli.py).
"""
from absl import app
from absl import flags

from experiments import cli
from mtvae_jax.thesis import crossval

_OUT = flags.DEFINE_string('out', None, 'Markdown file to write the table to.')


def main(argv):
  cli.configure_jax()
  print(cli.run(crossval.report, argv[1:], _OUT.value), end='')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser(
      'experiments.report', config=cli.REFUSED,
      usage='give one or more directories of experiments.crossval: '
            'python -m experiments.report <dir>... --out=<file.md>'))
