"""notebooks/quickstart.ipynb is committed with its outputs (the full run: loss plot and
samples visible on GitHub), and still runs top to bottom (quick mode) showing what it claims."""

import math
import os
import re

import pytest

pytestmark = pytest.mark.slow  # end-to-end: runs, servers, kill trials (minutes); CI runs them

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')
pytest.importorskip('ipykernel')
pytest.importorskip('torch')
pytest.importorskip('transformers')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'notebooks', 'quickstart.ipynb')
PROMPTS = ('村民们都很高兴', '中国人民', '今天的天气')


@pytest.fixture(scope='module')
def executed(tmp_path_factory):
  """(the executed notebook, its workdir)."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  workdir = str(tmp_path_factory.mktemp('notebook'))
  pythonpath = os.pathsep.join(p for p in (ROOT, os.environ.get('PYTHONPATH')) if p)
  env = dict(os.environ, PYTHONPATH=pythonpath, JAX_PLATFORMS='cpu', ZHGPT_NOTEBOOK_QUICK='1',
             ZHGPT_NOTEBOOK_WORKDIR=workdir)
  # 'python3' is ipykernel on this interpreter: jupyter_client runs a spec's 'python' as
  # sys.executable, and uses ipykernel's own spec when none is installed.
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                                   resources={'metadata': {'path': os.path.dirname(NOTEBOOK)}})
  client.execute(env=env)
  return nb, workdir


def stdout(cells) -> str:
  return ''.join(o.text for c in cells for o in c.outputs
                 if o.output_type == 'stream' and o.name == 'stdout')


def value(text: str, label: str) -> str:
  """What follows `label: ` on the line that starts with it."""
  m = re.search(rf'^{re.escape(label)}: *(.*)$', text, re.M)
  assert m, f'no {label!r} line in the outputs'
  return m.group(1).strip()


def check_outputs(nb, quick: bool) -> str:
  """Asserts what an executed notebook must show; returns its stdout."""
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), \
      'not executed top to bottom in one kernel'
  text = stdout(code)
  assert value(text, 'quick') == str(quick)

  first, final = float(value(text, 'first train loss')), float(value(text, 'final val loss'))
  assert math.isfinite(final) and final < first - 0.3, (first, final)

  plots = [c for c in code if any('image/png' in o.get('data', {}) for o in c.outputs)]
  assert len(plots) == 1 and 'read_metrics' in plots[0].source

  samples = [line for line in text.splitlines() if line.startswith(PROMPTS)]
  assert len(samples) >= len(PROMPTS) and any(s not in PROMPTS for s in samples), samples

  assert 'LlamaForCausalLM' in text.splitlines()   # configs/tiny.py is Llama-style
  assert value(text, 'tokenizer ids match') == 'True'
  assert value(text, 'greedy tokens match') == 'True'
  assert float(value(text, 'max |logit difference|')) < 1e-4
  assert re.search(r'^notebook ran in \d+ s$', text, re.M)
  return text


def test_committed_notebook_shows_the_full_run():
  """Cheap: reads the file. Re-run the notebook (full mode) when its code changes."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert nb.metadata.kernelspec.name == 'python3'
  text = check_outputs(nb, quick=False)
  assert value(text, 'workdir') == os.path.join('runs', 'notebook')   # no machine's paths


def test_notebook_trains_plots_samples_and_matches_transformers(executed):
  nb, workdir = executed
  text = check_outputs(nb, quick=True)
  assert value(text, 'workdir') == workdir
  assert os.path.exists(os.path.join(workdir, 'hf', 'model.safetensors'))
