"""The installable package: pyproject.toml, `pip install .` into a fresh venv, the `zhgpt`
command and `import zhgpt_jax` from a directory outside the repository, configs found there."""

import os
import shutil
import subprocess
import sys
import tomllib

import pytest

import zhgpt_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pyproject_takes_version_and_requirements_from_their_one_place():
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    project = tomllib.load(f)
  assert project['project']['scripts'] == {'zhgpt': 'zhgpt_jax.cli:run'}
  dynamic = project['tool']['setuptools']['dynamic']
  assert dynamic == {'version': {'attr': 'zhgpt_jax.__version__'},
                     'dependencies': {'file': ['requirements.txt']}}
  assert project['tool']['setuptools']['package-dir']['zhgpt_jax.configs'] == 'configs'


def _venv_env():
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'VIRTUAL_ENV')}
  return dict(env, JAX_PLATFORMS='cpu')


def test_pip_install_then_zhgpt_from_another_directory(tmp_path):
  # A copy of what pyproject.toml packages, so the build leaves nothing in the checkout.
  src = tmp_path / 'src'
  for name in ('zhgpt_jax', 'configs'):
    shutil.copytree(os.path.join(ROOT, name), src / name,
                    ignore=shutil.ignore_patterns('__pycache__'))
  for name in ('pyproject.toml', 'requirements.txt', 'README.md', 'main.py'):
    shutil.copy(os.path.join(ROOT, name), src / name)
  venv = tmp_path / 'venv'
  # The dependencies come from this interpreter's site-packages (CI installed them); the
  # package itself is built and installed from the copy, with no index.
  # (no pip of its own: this interpreter's pip and setuptools, not ensurepip's older ones)
  subprocess.run([sys.executable, '-m', 'venv', '--system-site-packages', '--without-pip',
                  str(venv)], check=True)
  bin_dir = venv / 'bin'
  pip = subprocess.run([str(bin_dir / 'python'), '-m', 'pip', 'install', '-q', '--no-deps',
                        '--no-build-isolation', '--no-index', str(src)], env=_venv_env(),
                       capture_output=True, text=True, timeout=300)
  assert pip.returncode == 0, pip.stderr[-2000:]
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()

  def run(*args):
    return subprocess.run([str(a) for a in args], cwd=elsewhere, env=_venv_env(),
                          capture_output=True, text=True, timeout=300)

  installed = os.path.dirname(run(bin_dir / 'python', '-c', 'import zhgpt_jax; '
                                  'print(zhgpt_jax.__file__)').stdout.strip())
  for name, target in (('zhgpt_jax', installed), ('configs', os.path.join(installed, 'configs'))):
    want = {os.path.relpath(os.path.join(d, f), os.path.join(ROOT, name))
            for d, _, files in os.walk(os.path.join(ROOT, name)) for f in files
            if '__pycache__' not in d and not f.endswith('.pyc')}
    have = {os.path.relpath(os.path.join(d, f), target)
            for d, _, files in os.walk(target) for f in files if '__pycache__' not in d}
    assert want <= have, f'not installed (pyproject.toml packages / package-data): {want - have}'
  out = run(bin_dir / 'zhgpt', '--version')
  assert out.returncode == 0 and out.stdout.strip() == f'zhgpt-jax {zhgpt_jax.__version__}'
  out = run(bin_dir / 'python', '-c',
            'import zhgpt_jax, zhgpt_jax.config as c; print(zhgpt_jax.__file__); '
            'print(c.configs_dir()); print(c.load_preset("moe", "deepseek").model.moe.n_routed)')
  assert out.returncode == 0, out.stderr
  package, configs, routed = out.stdout.split()
  assert package.startswith(str(venv)) and configs == os.path.join(os.path.dirname(package),
                                                                   'configs')
  assert routed == '64'   # moe.py built on modern.py built on tiny.py, all from the package
  # `configs/tiny.py` is not in this directory: it is the package's, parsed and validated.
  out = run(bin_dir / 'zhgpt', '--config', 'configs/tiny.py', '--config.train.stepz=5')
  assert out.returncode == 2 and out.stderr.startswith(
      'zhgpt: error: unknown config key --config.train.stepz'), out.stderr
  out = run(bin_dir / 'zhgpt', 'prepare', '--config=configs/modern.py:tiny',
            '--config.data.corpus=/no/such/file.jsonl')
  assert out.returncode == 2 and '/no/such/file.jsonl' in out.stderr, out.stderr


def test_notebook_imports_without_touching_sys_path():
  nbformat = pytest.importorskip('nbformat')
  nb = nbformat.read(os.path.join(ROOT, 'notebooks', 'quickstart.ipynb'), as_version=4)
  code = '\n'.join(c.source for c in nb.cells if c.cell_type == 'code')
  assert 'sys.path' not in code and 'from configs' not in code
