"""main.py as the README shows it: every command there is run here or by a test named in
README_COMMANDS, and user mistakes print one line and exit 2.

One tiny run trained through the command line (configs/tiny.py with the README's overrides,
on the session's tiny corpus) is evaluated, sampled and fine-tuned with configs/sft.py, and
the chat CLI talks to the result over stdin. Processes share an XLA compilation cache.
"""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from zhgpt_jax import checkpoint, metrics, sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_STEPS = 8             # the pretraining run: evaluated and saved at steps 4 and 8
SFT_STEPS = 4
PROMPTS = ['村民们都很高兴', '今天', '人民']
# The tiny run's shape; configs/sft.py must be given the same to fine-tune it.
SHAPE = {'model.n_layer': 2, 'model.n_head': 2, 'model.d_model': 64, 'model.seq_len': 128,
         'model.vocab_multiple': 64, 'model.mlp': 'relu2'}
# Fewer, smaller batches than the configs' own, for both runs.
QUICK = {'train.per_device_batch': 4, 'train.log_every': 1, 'train.eval_max_batches': 1,
         'train.eval_batch': 4, 'train.sample_tokens': 4, 'train.peak_flops': 1e11}

MULTIHOST = 'test_multihost.py; test_cli.py::test_user_mistakes_are_one_line_exit_2'
# Every command of README.md and docs/multihost.md, and the test that runs it. Where a command
# cannot run here (a GPU, real hosts, hours of training), the test runs it as far as it can.
README_COMMANDS = {
    # train (the main job): configs/tiny.py from the command line, on the tiny corpus
    'pip install -e . && python main.py --config configs/tiny.py':
        'test_cli.py::test_train_with_readme_overrides',
    'python main.py --config configs/tiny.py': 'test_cli.py::test_train_with_readme_overrides',
    # .ci/run is this command
    'pip install -e . -r requirements-dev.txt && python -m pytest -q tests': '.ci/run',
    # the package in a fresh venv, its `zhgpt` command from another directory (up to validation)
    'pip install . && cd /tmp && zhgpt --config configs/tiny.py --config.train.steps=20':
        'test_package.py::test_pip_install_then_zhgpt_from_another_directory',
    # GGUF for llama.cpp and Ollama (no ollama here: the Modelfile is checked)
    'python main.py export --workdir runs/tiny --out runs/tiny.gguf --format gguf --gguf_type q8_0':
        'test_train.py::test_cli_eval_sample_and_export',
    'ollama create zhgpt-tiny -f runs/tiny.Modelfile': 'test_gguf_export.py::test_modelfile_for_ollama',
    'ollama run zhgpt-tiny 村民们都很高兴': 'test_gguf_export.py::test_modelfile_for_ollama',
    'python main.py --config configs/tiny.py --config.train.steps=500 --config.optim.lr=1e-3':
        'test_cli.py::test_train_with_readme_overrides',
    'python main.py --config configs/tiny.py --workdir runs/exp1 --config.model.mlp=relu2':
        'test_cli.py::test_train_with_readme_overrides',
    'python main.py --config configs/tiny.py:gpt2 --workdir runs/gpt2':
        'test_cli.py::test_every_config_of_the_readme_loads_and_validates',
    'python main.py prepare --config configs/tiny.py':
        'test_cli.py::test_prepare_base_config_with_a_corpus_list',
    # configs/base.py is GPT-2 small with cuDNN attention: prepared and validated here
    "python main.py --config configs/base.py "
    "--config.data.corpus='/data/zh/*.jsonl,/data/books/'":
        'test_cli.py::test_prepare_base_config_with_a_corpus_list',
    'pip install -r requirements.txt && pip install -U "jax[cuda12]"': 'not run: needs CUDA',
    'python main.py --config configs/base.py':
        'test_cli.py::test_prepare_base_config_with_a_corpus_list; '
        'test_cli.py::test_every_config_of_the_readme_loads_and_validates',
    # several hosts: the same flags on localhost (test_multihost), their validation here
    'python main.py --config configs/base.py --workdir /shared/runs/base '
    '--config.dist.coordinator=host0:12345 --config.dist.num_processes=N '
    '--config.dist.process_id=i': MULTIHOST,
    'python main.py --config configs/base.py --workdir /shared/runs/gpt2 '
    '--config.dist.coordinator=10.0.0.1:1234 --config.dist.num_processes=2 '
    '--config.dist.process_id=0': MULTIHOST,
    'srun python main.py --config configs/base.py --workdir /shared/runs/gpt2':
        'test_parallel.py::test_slurm_one_task_per_node_drives_every_gpu',
    'for i in 0 1; do XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu '
    'python main.py --config configs/tiny.py --workdir runs/mh '
    '--config.dist.coordinator=127.0.0.1:12345 --config.dist.num_processes=2 '
    '--config.dist.process_id=$i & done; wait': 'test_multihost.py',
    # the sharded strategy: its main.py runs use these flags (8 simulated devices)
    'python main.py --config configs/base.py --config.parallel.strategy=fsdp':
        'test_fsdp.py::test_the_fsdp_run_reports_its_layout_and_samples',
    'python main.py --config configs/base.py --config.parallel.strategy=fsdp '
    '--config.parallel.data=2 --config.parallel.fsdp=4':
        'test_fsdp.py::test_a_fsdp_checkpoint_resumes_in_other_layouts',
    # expert parallelism: the train step and checkpoints of this layout (8 simulated devices)
    'python main.py --config configs/moe.py:deepseek --config.parallel.strategy=fsdp '
    '--config.parallel.data=2 --config.parallel.expert=4':
        'test_moe.py::test_expert_parallel_training_equals_one_device; '
        'test_fsdp.py::test_the_rule_puts_every_expert_stack_on_the_expert_axis',
    # after training
    'python main.py eval --workdir runs/tiny': 'test_train.py::test_cli_eval_sample_and_export',
    'python main.py eval --workdir runs/tiny --step 500': 'test_cli.py::test_eval_at_a_step',
    'python main.py eval --workdir runs/tiny --tasks zh_mc --task_data /data/ceval-exam '
    '--num_fewshot 5': 'test_harness.py::test_main_py_eval_tasks_equals_lm_eval_hf',
    'python main.py eval --workdir runs/sft --tasks zh_sentiment,zh_sentiment_chat --limit 200':
        'test_harness.py::test_the_sentiment_tasks_run_on_the_model',
    'lm_eval --model local-completions --model_args model=tiny,base_url=http://127.0.0.1:8000/'
    'v1/completions,tokenizer=runs/tiny-hf,tokenizer_backend=huggingface,max_length=128,'
    'num_concurrent=8 --tasks zh_mc --include_path zhgpt_jax/lm_tasks --metadata '
    '\'{"data_dir": "/data/ceval-exam"}\'':
        'test_logprobs.py::test_lm_eval_command_through_the_server_equals_lm_eval_hf',
    'python main.py sample --workdir runs/tiny --prompt "村民们都很高兴"':
        'test_train.py::test_cli_eval_sample_and_export',
    'python main.py sample --workdir runs/tiny --prompt_file prompts.txt '
    '--config.sample.temperature=0.7 --config.sample.top_p=0.9':
        'test_cli.py::test_sample_prompt_file_with_overrides',
    'python main.py chat --workdir runs/sft': 'test_cli.py::test_chat_over_stdin',
    'python main.py --config configs/sft.py': 'test_cli.py::test_sft_config_fine_tunes_a_run',
    'python main.py export --workdir runs/tiny --out runs/tiny-hf':
        'test_train.py::test_cli_eval_sample_and_export',
    # serving: the module's server is started with these flags (--port, a key from the env,
    # a --config.serve override); the curl lines are run against it
    'python main.py serve --workdir runs/sft': 'test_serve.py::test_models_health_and_page',
    'python main.py serve --workdir runs/sft --host 0.0.0.0 --port 8080 --api_key SECRET '
    '--config.serve.slots=32': 'test_serve.py::test_serve_flags_and_hf_directory',
    'curl http://127.0.0.1:8000/v1/chat/completions -H "Content-Type: application/json" '
    '-H "Authorization: Bearer $ZHGPT_API_KEY" -d \'{"model": "sft", "messages": [{"role": '
    '"user", "content": "你好"}], "max_tokens": 32}\'': 'test_serve.py::test_readme_examples',
    'curl -N http://127.0.0.1:8000/v1/completions -H "Content-Type: application/json" '
    '-H "Authorization: Bearer $ZHGPT_API_KEY" -d \'{"model": "sft", "prompt": "村民们都很高兴", '
    '"max_tokens": 32, "stream": true, "top_k": 20}\'': 'test_serve.py::test_readme_examples',
    # start from a pretrained model: stock transformers checkpoints built by the test
    'python main.py --config configs/tiny.py --config.init_from=hf:/models/gpt2-zh '
    '--workdir runs/gpt2-zh': 'test_pretrained.py::test_trains_on_the_checkpoints_own_tokenizer',
    'python main.py --config configs/sft.py --config.init_from=hf:/models/qwen2-0.5b '
    '--workdir runs/qwen-sft':
        'test_pretrained.py::test_sft_adds_chatml_and_the_chat_export_stops_at_im_end',
    'python main.py export --workdir runs/qwen-sft --out runs/qwen-sft-hf':
        'test_pretrained.py::test_export_loads_in_transformers_with_equal_logits_and_greedy',
}


def run(*args, cwd=ROOT, env=None, stdin=None, timeout=300):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', **(env or {}))
  return subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), *args], cwd=cwd,
                        env=env, input=stdin, capture_output=True, text=True, timeout=timeout)


def flags(values: dict) -> list[str]:
  return [f'--config.{k}={v}' for k, v in values.items()]


def readme_commands() -> list[str]:
  """The command lines of the bash blocks of README.md and docs/multihost.md."""
  commands = []
  for doc in ('README.md', os.path.join('docs', 'multihost.md')):
    with open(os.path.join(ROOT, doc), encoding='utf-8') as f:
      blocks = re.findall(r'```bash\n(.*?)```', f.read(), re.S)
    for block in blocks:
      lines = [re.sub(r'(^|\s)#.*', '', line).strip() for line in block.splitlines()]
      text = '\n'.join(line for line in lines if line)
      text = re.sub(r'\s*\\\n\s*', ' ', text)               # continued lines
      text = re.sub(r'(\bdo|&)\n', r'\1 ', text)               # a shell loop
      commands += [' '.join(c.split()) for c in text.splitlines()]
  return commands


def test_every_readme_command_is_exercised():
  assert sorted(set(readme_commands())) == sorted(README_COMMANDS)
  for where in README_COMMANDS.values():
    for test in re.findall(r'(test_\w+\.py)::(test_\w+)', where):
      with open(os.path.join(ROOT, 'tests', test[0]), encoding='utf-8') as f:
        assert f'def {test[1]}(' in f.read(), where


@pytest.mark.parametrize('args, message', [
    (['frobnicate', '--config', 'configs/tiny.py'], "unknown command 'frobnicate'"),
    ([], '--config is required'),
    (['--config', 'configs/nope.py'], 'configs/nope.py: no such config file'),
    (['--config', 'configs/tiny.py', '--config.train.stepz=5'],
     'unknown config key --config.train.stepz (Did you mean "steps"'),
    (['--config', 'configs/tiny.py', '--config.train.steps=abc'],
     "--config.train.steps=abc: invalid literal for int()"),
    (['--config', 'configs/tiny.py', '--config.model.dropout=1.5'],
     'config.model.dropout=1.5: must be in [0, 1)'),
    (['--config', 'configs/tiny.py', '--config.model.mlp=relu'],
     "config.model.mlp='relu': must be one of gelu, relu2, swiglu, moe"),
    (['--config', 'configs/tiny.py', '--config.optim.name=sgd'],
     "config.optim.name='sgd': must be one of adamw, muon"),
    (['prepare', '--config', 'configs/tiny.py', '--config.data.corpus=/no/such/file.jsonl'],
     '/no/such/file.jsonl'),
    (['sample', '--workdir', '/no/such/run'], '--config is required'),
    # The README's multi-host command, with a process id out of range or no port.
    (['--config', 'configs/base.py', '--workdir', '/shared/runs/base',
      '--config.dist.coordinator=host0:12345', '--config.dist.num_processes=2',
      '--config.dist.process_id=2'],
     'config.dist.process_id=2: must be in [0, dist.num_processes=2)'),
    (['--config', 'configs/base.py', '--config.dist.coordinator=host0',
      '--config.dist.num_processes=2', '--config.dist.process_id=0'],
     "config.dist.coordinator='host0': must be 'host:port'"),
])
def test_user_mistakes_are_one_line_exit_2(args, message):
  out = run(*args)
  assert out.returncode == 2, out.stderr
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, out.stderr
  assert lines[0].startswith('main.py: error: ') and message in lines[0], lines[0]
  assert 'Traceback' not in out.stdout + out.stderr


def test_a_typo_in_a_config_file_names_the_key(tmp_path):
  """default_config() is locked: a key the file sets that does not exist is an error."""
  path = tmp_path / 'typo.py'
  path.write_text('from configs.tiny import get_config as tiny\n\n\ndef get_config():\n'
                  '  c = tiny()\n  c.train.stepz = 5\n  return c\n')
  out = run('prepare', '--config', str(path), '--workdir', str(tmp_path / 'run'))
  assert (out.returncode, out.stderr) == (2, f"main.py: error: --config {path}: line 6: unknown "
                                          'config key \'stepz\' (Did you mean "steps" instead '
                                          'of "stepz"?)\n')
  assert not os.path.exists(tmp_path / 'run')


@pytest.mark.parametrize('config', ['configs/tiny.py', 'configs/tiny.py:gpt2',
                                    'configs/base.py', 'configs/base.py:medium',
                                    'configs/base.py:xl', 'configs/modern.py',
                                    'configs/modern.py:tiny', 'configs/moe.py',
                                    'configs/moe.py:deepseek', 'configs/sft.py'])
def test_every_config_of_the_readme_loads_and_validates(config):
  # The config is validated before `prepare` reads the corpus, whose absence is the one error.
  out = run('prepare', '--config', config, '--config.data.corpus=/no/such/dir/')
  assert out.returncode == 2 and out.stderr.count('\n') == 1, out.stderr
  assert out.stderr.startswith('main.py: error: ') and '/no/such/dir/' in out.stderr, out.stderr


# ----------------------------------------------------------------------------- a run, end to end

@pytest.fixture(scope='module')
def xla_cache(tmp_path_factory):
  """One XLA compilation cache for this module's processes: eval, sample and chat reuse it."""
  return dict(JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp('xla_cache')),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')


@pytest.fixture(scope='module')
def tiny_run(tiny_data, xla_cache, tmp_path_factory):
  """The README's two training commands as one, on the session's prepared tiny corpus."""
  workdir = str(tmp_path_factory.mktemp('cli') / 'exp1')
  data = {f'data.{k}': v for k, v in tiny_data.config.data.items()}
  data.update({f'tokenizer.{k}': v for k, v in tiny_data.config.tokenizer.items()})
  data['data.cache_dir'] = tiny_data.data_dir           # its tokenizer and shards are reused
  out = run('--config', 'configs/tiny.py', '--workdir', workdir,
            f'--config.train.steps={TINY_STEPS}', '--config.optim.lr=1e-3',
            '--config.model.mlp=relu2',
            *flags(data), *flags(SHAPE), *flags(QUICK),
            *flags({'train.eval_every': 4, 'train.ckpt_every': 4, 'optim.warmup_steps': 2}),
            env=xla_cache)
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir, out.stdout


def records(workdir: str, split: str) -> list[dict]:
  return [r for r in metrics.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
          if r['split'] == split]


@pytest.mark.slow
def test_train_with_readme_overrides(tiny_run):
  workdir, stdout = tiny_run
  with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
    saved = json.load(f)
  assert saved['train']['steps'] == TINY_STEPS and saved['optim']['lr'] == 1e-3
  assert (saved['model']['position'], saved['model']['mlp']) == ('rope', 'relu2')  # tiny.py's, the override's
  train = records(workdir, 'train')
  assert [r['step'] for r in train] == list(range(1, TINY_STEPS + 1))
  assert max(r['lr'] for r in train) == pytest.approx(1e-3, rel=1e-6)   # the peak, after warmup
  assert [r['step'] for r in records(workdir, 'val')] == [4, TINY_STEPS]
  assert 'reused tokenizer and shards' in stdout and f'done: {TINY_STEPS} steps' in stdout
  _, params, _ = checkpoint.load_params(workdir)
  assert 'wpe' not in params and 'gate' not in params['h_0']['mlp']    # rope, no SwiGLU gate


@pytest.mark.slow
def test_eval_at_a_step(tiny_run, xla_cache):
  workdir, _ = tiny_run
  out = run('eval', '--workdir', workdir, '--step', '4', env=xla_cache)
  assert out.returncode == 0, out.stderr[-3000:]
  line = out.stdout.strip().splitlines()[-1]
  assert line.startswith('step 4: loss '), out.stdout[-2000:]
  loss = float(line.split('loss ')[1].split(',')[0])
  logged = {r['step']: r['loss'] for r in records(workdir, 'val')}
  ckpt = checkpoint.Checkpointer(workdir, keep=3, async_save=False)
  try:
    saved = ckpt.meta(4)['val']['loss']
  finally:
    ckpt.close()
  # The step-4 checkpoint's val loss as training logged and saved it, not the latest one's.
  assert saved == pytest.approx(logged[4], abs=1e-6)
  assert loss == pytest.approx(logged[4], abs=6e-5)        # printed to 4 decimals
  assert abs(loss - logged[TINY_STEPS]) > 1e-3


@pytest.mark.slow
def test_sample_prompt_file_with_overrides(tiny_run, xla_cache, tmp_path):
  workdir, _ = tiny_run
  prompt_file = tmp_path / 'prompts.txt'
  prompt_file.write_text('\n'.join(PROMPTS[:1] + [''] + PROMPTS[1:]) + '\n', encoding='utf-8')
  out = run('sample', '--workdir', workdir, '--prompt_file', str(prompt_file),
            '--config.sample.temperature=0.7', '--config.sample.top_p=0.9', env=xla_cache)
  assert out.returncode == 0, out.stderr[-3000:]
  # The same in Python, as the README shows it: the command line must print its texts.
  cfg, params, tokenizer, config, _ = checkpoint.load_model(workdir)
  config.sample.update(temperature=0.7, top_p=0.9)
  texts = sample.generate_text(cfg, params, tokenizer, PROMPTS, config.sample)
  assert out.stdout == ''.join(f'{p}{t}\n' for p, t in zip(PROMPTS, texts))
  assert any(texts)
  # configs/tiny.py asks for 64 new tokens, which fit after these prompts: no note, no cut.
  assert 'new tokens at most' not in out.stderr
  # Asking for as many new tokens as the context holds (128) generates what fits after the
  # longest prompt instead of refusing, in Python as on the command line.
  longest = max(len(tokenizer.encode(p).ids) for p in PROMPTS)
  config.sample.update(temperature=0.0, max_new_tokens=128)
  capped = sample.generate_text(cfg, params, tokenizer, PROMPTS, config.sample)
  config.sample.max_new_tokens = 128 - longest
  assert capped == sample.generate_text(cfg, params, tokenizer, PROMPTS, config.sample)
  assert any(len(t) > 0 for t in capped)


@pytest.fixture(scope='module')
def sft_run(tiny_run, xla_cache, tmp_path_factory):
  """`python main.py --config configs/sft.py`, fine-tuning tiny_run on the builtin task."""
  pretrained, _ = tiny_run
  workdir = str(tmp_path_factory.mktemp('cli') / 'sft')
  out = run('--config', 'configs/sft.py', '--workdir', workdir,
            f'--config.init_from={pretrained}', *flags(SHAPE), *flags(QUICK),
            *flags({'train.steps': SFT_STEPS, 'optim.warmup_steps': 1,
                    'train.eval_every': SFT_STEPS, 'train.ckpt_every': SFT_STEPS,
                    'sft.eval_examples': 4, 'seed': 1}), env=xla_cache)
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir, out.stdout


@pytest.mark.slow
def test_sft_config_fine_tunes_a_run(sft_run, tiny_run):
  workdir, stdout = sft_run
  with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
    saved = json.load(f)
  assert saved['task'] == 'sft' and saved['init_from'] == tiny_run[0]
  assert 'sft data: 16363 conversations' in stdout     # the builtin task: reviews minus 1,000
  val = records(workdir, 'val')
  assert [r['step'] for r in val] == [SFT_STEPS] and 0.0 <= val[0]['accuracy'] <= 1.0
  # It started from the pretrained weights: a few steps at lr <= 1e-3 move each of them by
  # a few 1e-3 at most, while a fresh init (another seed) differs by ~0.1.
  _, tuned, _ = checkpoint.load_params(workdir)
  _, pretrained, _ = checkpoint.load_params(tiny_run[0])
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), tuned, pretrained)
  assert 0 < max(jax.tree.leaves(moved)) < 0.01, moved


@pytest.mark.slow
def test_chat_over_stdin(sft_run, xla_cache):
  workdir, _ = sft_run
  out = run('chat', '--workdir', workdir, '--config.sample.temperature=0', env=xla_cache,
            stdin='你好\n/reset\n你好\n/exit\n不会读到\n')
  assert out.returncode == 0, out.stderr[-3000:]
  header = f'{workdir} step {SFT_STEPS}: /reset clears the history, /exit quits\n'
  assert out.stdout.startswith(header), out.stdout[:500]
  turns = out.stdout[len(header):].split('你: ')
  # Four lines read (the fifth never is): a reply, the reset, the same reply again (greedy,
  # from the same empty history), and the exit.
  assert turns[0] == '' and len(turns) == 5, out.stdout
  first, reset, again, exit_ = turns[1:]
  assert first.startswith('助手: ') and first.endswith('\n') and len(first) > len('助手: \n')
  assert reset == '(history cleared)\n' and again == first and exit_ == ''


@pytest.mark.slow
def test_prepare_base_config_with_a_corpus_list(tmp_path):
  """configs/base.py (GPT-2 small, cuDNN attention) validated, its corpus read and prepared."""
  news = [f'第{i}条新闻：人民群众生活水平不断提高，各地经济稳步发展。' for i in range(60)]
  (tmp_path / 'zh').mkdir()
  (tmp_path / 'books').mkdir()
  with open(tmp_path / 'zh' / 'a.jsonl', 'w', encoding='utf-8') as f:
    for text in news[:30]:
      f.write(json.dumps({'text': text}, ensure_ascii=False) + '\n')
    f.write('{not json\n')
  with open(tmp_path / 'zh' / 'b.jsonl', 'w', encoding='utf-8') as f:
    for text in news[30:]:
      f.write(json.dumps({'text': text}, ensure_ascii=False) + '\n')
  (tmp_path / 'zh' / 'notes.txt').write_text('不在 *.jsonl 里\n', encoding='utf-8')
  (tmp_path / 'books' / 'c.txt').write_text('书的第一行。\n书的第二行。\n', encoding='utf-8')
  corpus = f'{tmp_path}/zh/*.jsonl,{tmp_path}/books/'
  out = run('prepare', '--config', 'configs/base.py', '--workdir', str(tmp_path / 'base'),
            f"--config.data.corpus={corpus}")
  assert out.returncode == 0, out.stderr[-3000:]
  docs = {s: int(n.replace(',', '')) for s, n in
          re.findall(r'(train|val): +([\d,]+) documents', out.stdout)}
  assert sum(docs.values()) == 62, out.stdout
  assert 'skipped 1 malformed' in out.stdout and 'a.jsonl' in out.stdout, out.stdout
  meta = json.loads((tmp_path / 'base' / 'data' / 'train' / 'meta.json').read_text())
  assert meta['documents'] == docs['train'] and meta['tokens'] > 0
  # The glob took the two .jsonl files (not notes.txt), the directory its .txt file.
  assert {os.path.basename(p): s['documents'] for p, s in meta['sources'].items()} == {
      'a.jsonl': 30, 'b.jsonl': 30, 'c.txt': 2}
