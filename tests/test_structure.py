"""The package's shape: imports between its modules form no cycle and follow README's Code
map (each module imports only modules listed above it); no module over 500 lines."""

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'zhgpt_jax')
MAX_LINES = 500


def modules() -> dict[str, str]:
  """name -> path of every module of the package."""
  return {f[:-3]: os.path.join(PACKAGE, f) for f in sorted(os.listdir(PACKAGE))
          if f.endswith('.py') and f != '__init__.py'}


def imports(path: str, names) -> set[str]:
  """The package modules `path` imports anywhere in it (in functions too)."""
  found = set()
  for node in ast.walk(ast.parse(open(path, encoding='utf-8').read())):
    if isinstance(node, ast.ImportFrom) and node.module:
      if node.module == 'zhgpt_jax':
        found |= {a.name for a in node.names}
      elif node.module.startswith('zhgpt_jax.'):
        found.add(node.module.split('.')[1])
    elif isinstance(node, ast.Import):
      found |= {a.name.split('.')[1] for a in node.names if a.name.startswith('zhgpt_jax.')}
  return found & set(names)


def import_graph() -> dict[str, set[str]]:
  names = modules()
  return {name: imports(path, names) - {name} for name, path in names.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """A list of modules a -> b -> ... -> a, or None (depth-first search)."""
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 'open':
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    state[node] = 'done'
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_find_cycle_finds_one():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': set()}) is None
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']


def test_no_import_cycle_between_modules():
  graph = import_graph()
  cycle = find_cycle(graph)
  assert cycle is None, ' -> '.join(cycle)


def test_training_does_not_know_its_tasks_or_commands():
  graph = import_graph()
  assert not graph['train'] & {'sft', 'chat', 'sft_batches'}, graph['train']


def code_map() -> list[str]:
  """Module names in the order of README.md's "Code map" table."""
  with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
    text = f.read()
  section = text.split('## Code map', 1)[1].split('\n## ', 1)[0]
  return re.findall(r'^\| `zhgpt_jax/(\w+)\.py` \|', section, re.M)


def test_imports_follow_the_code_map():
  order, graph = code_map(), import_graph()
  assert sorted(order) == sorted(graph), (
      f'README Code map lists {sorted(set(order) - set(graph))} that do not exist and misses '
      f'{sorted(set(graph) - set(order))}: one line per zhgpt_jax module, in dependency order')
  for i, name in enumerate(order):
    below = graph[name] - set(order[:i])
    assert not below, f'{name} imports {sorted(below)}, listed below it in README\'s Code map'


CONFIGS = ['tiny', 'base', 'base:medium', 'modern', 'modern:tiny', 'moe', 'moe:deepseek', 'sft']


def _config_file(spec: str):
  import importlib.util
  name, _, arg = spec.partition(':')
  loader = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(loader)
  loader.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


@pytest.mark.parametrize('spec', CONFIGS)
def test_every_model_key_is_a_model_field(spec):
  """Every key under config.model (of each config file) is the GPTConfig field of the same
  path (gpt_config.py declares both): no key the model never sees, none renamed on the way."""
  from zhgpt_jax import gpt_config
  keys = set(gpt_config.flatten(_config_file(spec).model))
  fields = {p for p, f in gpt_config.fields() if f.metadata['config']}
  assert keys == fields, (sorted(keys - fields), sorted(fields - keys))


def test_every_model_key_reaches_the_model():
  """Changing any config.model key changes the GPTConfig that `model.model_config` builds, at
  the same path: a knob cannot be silently ignored. (attention: on CPU 'cudnn' runs xla.)"""
  from zhgpt_jax import gpt_config, model
  from zhgpt_jax.config import default_config
  c = default_config('tiny')
  base = model.model_config(c.model, 300)
  for path, value in gpt_config.flatten(c.model).items():
    f = dict(gpt_config.fields())[path]
    if f.metadata['choices']:
      new = next(v for v in f.metadata['choices'] if v != value)
    elif isinstance(value, bool):
      new = not value
    else:
      new = type(value)(value * 2 + 1000)   # vocab_size: more rows than the tokenizer
    changed = node = c.model.copy_and_resolve_references()
    *head, last = path.split('.')
    for part in head:
      node = node[part]
    node[last] = new
    got = model.model_config(changed, 300)
    if path != 'attention':
      assert gpt_config.get(got, path) != gpt_config.get(base, path), path


def test_one_list_of_parameter_fields():
  """What init_from=hf:DIR writes into config.model is every parameter field but the two it
  fits: gpt_config's kinds stay the one list."""
  from zhgpt_jax import gpt_config, model, pretrained
  deepseek = model.model_config(_config_file('moe:deepseek').model, 300)   # every group used
  written = set(pretrained.shape_paths(deepseek))
  assert written | set(pretrained.FITTED) == set(gpt_config.param_paths())
  kinds = {p: f.metadata['kind'] for p, f in gpt_config.fields()}
  assert {kinds[p] for p in written} == {gpt_config.PARAM}
  dense = model.model_config(_config_file('tiny').model, 300)
  assert set(pretrained.shape_paths(dense)) == {
      p for p in written if not p.startswith(('moe.', 'mla.'))}


# `main.py prepare` and the pool workers of prepare and of the SFT rows import these.
PREPARE_PATH = ('dataprep', 'pool', 'scan', 'encode', 'peek', 'sft_format', 'sft_shards',
                'pretrained')


def test_the_prepare_path_never_imports_jax():
  """Importing the prepare path (and so every module it imports) loads no JAX: a pool worker
  that did would take seconds and hundreds of MB more to start."""
  import subprocess
  import sys
  code = ('import sys\n' + ''.join(f'import zhgpt_jax.{m}\n' for m in PREPARE_PATH) +
          'print(sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "flax")))')
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == '[]', out.stdout


@pytest.mark.parametrize('name', sorted(modules()))
def test_module_is_at_most_500_lines(name):
  with open(modules()[name], encoding='utf-8') as f:
    n = sum(1 for _ in f)
  assert n <= MAX_LINES, f'zhgpt_jax/{name}.py has {n} lines'
