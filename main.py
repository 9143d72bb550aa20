"""zhgpt-jax command line, run from a checkout: `python main.py [COMMAND] --config configs/X.py`.

The same as the `zhgpt` command that `pip install .` puts on the PATH; the code is in
zhgpt_jax/cli.py.
"""

from zhgpt_jax.cli import main, parse_flags, run  # pylint: disable=unused-import

if __name__ == '__main__':
  run()
