"""lm-evaluation-harness on our model: `main.py eval --tasks` (in-process, harness.py) and the
lm_eval command against `main.py serve`, each against `lm_eval --model hf` on the export.

The model is a random-weight tiny model (tests/serving.py) whose vocabulary is not padded,
so HF's softmax and argmax range over the same ids as ours. The tasks are written here: a
C-Eval-layout directory read by our zh_mc task, a generation task and a rolling
log-likelihood task as the user's own YAML (the texts span several 64-token windows).
"""

from __future__ import annotations

import copy
import csv
import glob
import json
import os
import random
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from serving import ROOT, random_workdir
from zhgpt_jax import checkpoint, dataprep, eval_tasks, export, harness, score
from zhgpt_jax import model as model_lib
from zhgpt_jax.config import UserError

pytestmark = pytest.mark.slow  # end-to-end: runs, servers, kill trials (minutes); CI runs them

WORDS = ('经济', '发展', '人民', '生活', '城市', '学生', '中国', '今天', '我们', '新的', '工作', '问题')
TASKS = 'zh_mc,zt_gen,zt_ppl'


def _text(rng, lo, hi):
  return ''.join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def write_tasks(root: str) -> dict:
  """The test's tasks under `root`: {'data': zh_mc's directory, 'path': the YAML directory}."""
  rng = random.Random(0)
  mc = os.path.join(root, 'mc')
  for split, n in (('dev', 5), ('val', 40)):
    os.makedirs(os.path.join(mc, split))
    with open(os.path.join(mc, split, f'economics_{split}.csv'), 'w', newline='',
              encoding='utf-8') as f:
      w = csv.writer(f)
      w.writerow(['id', 'question', 'A', 'B', 'C', 'D', 'answer'])
      for i in range(n):
        w.writerow([i, _text(rng, 2, 6) + '？', *(_text(rng, 1, 3) for _ in range(4)),
                    'ABCD'[rng.randrange(4)]])
  with open(os.path.join(mc, 'subject_mapping.json'), 'w', encoding='utf-8') as f:
    json.dump({'economics': ['Economics', '经济学', 'Social Science']}, f, ensure_ascii=False)
  path = os.path.join(root, 'tasks')
  os.makedirs(path)
  with open(os.path.join(path, 'gen.jsonl'), 'w', encoding='utf-8') as f:
    for _ in range(16):
      f.write(json.dumps(dict(prompt=_text(rng, 2, 6), answer=_text(rng, 1, 2)),
                         ensure_ascii=False) + '\n')
  with open(os.path.join(path, 'text.jsonl'), 'w', encoding='utf-8') as f:
    for i in range(5):
      f.write(json.dumps(dict(text='，'.join(_text(rng, 2, 6) for _ in range(2 + 8 * i))),
                         ensure_ascii=False) + '\n')
  common = 'test_split: test\nmetadata:\n  version: 1.0\n'
  with open(os.path.join(path, 'zt_gen.yaml'), 'w', encoding='utf-8') as f:
    f.write(f'task: zt_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n'
            f'    test: {path}/gen.jsonl\n{common}output_type: generate_until\n'
            'doc_to_text: "问：{{prompt}}\\n答："\ndoc_to_target: answer\n'
            'generation_kwargs:\n  until: ["\\n", "。"]\n  max_gen_toks: 12\n  do_sample: false\n'
            'metric_list:\n  - metric: exact_match\n    aggregation: mean\n'
            '    higher_is_better: true\n')
  with open(os.path.join(path, 'zt_ppl.yaml'), 'w', encoding='utf-8') as f:
    f.write(f'task: zt_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n'
            f'    test: {path}/text.jsonl\n{common}output_type: loglikelihood_rolling\n'
            'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
            'metric_list:\n  - metric: bits_per_byte\n')
  return dict(data=mc, path=path)


def read_samples(directory: str) -> dict:
  """{task: {doc_id: sample}} of lm_eval's samples_<task>_<time>.jsonl files under `directory`."""
  out = {}
  for p in glob.glob(os.path.join(directory, '**', 'samples_*.jsonl'), recursive=True):
    task = os.path.basename(p)[len('samples_'):].rsplit('_', 1)[0]
    with open(p, encoding='utf-8') as f:
      out[task] = {r['doc_id']: r for r in map(json.loads, f)}
  return out


def read_results(directory: str) -> dict:
  (path,) = glob.glob(os.path.join(directory, '**', 'results_*.json'), recursive=True)
  with open(path, encoding='utf-8') as f:
    return json.load(f)['results']


def assert_same_as_hf(got: dict, want: dict, results: dict, want_results: dict, ppl_rel=1e-4):
  """Per item: the MC choices' log-likelihoods within 1e-4 and the same pick, the same
  generated text, the rolling log-likelihood within `ppl_rel`; the same accuracy."""
  assert set(got) == set(want) == set(TASKS.split(','))
  mc, ref = got['zh_mc'], want['zh_mc']
  assert sorted(mc) == sorted(ref) == list(range(40))
  for i, r in mc.items():   # lm_eval's command writes the numbers as strings
    lls = [float(x[0]) for x in r['filtered_resps']]
    ref_lls = [float(x[0]) for x in ref[i]['filtered_resps']]
    np.testing.assert_allclose(lls, ref_lls, atol=1e-4, rtol=0)
    assert np.argmax(lls) == np.argmax(ref_lls) and float(r['acc']) == float(ref[i]['acc'])
  assert [got['zt_gen'][i]['filtered_resps'] for i in range(16)] == \
      [want['zt_gen'][i]['filtered_resps'] for i in range(16)]
  assert sum(len(want['zt_gen'][i]['filtered_resps'][0]) > 0 for i in range(16)) > 8
  for i, r in got['zt_ppl'].items():
    ll, ref_ll = r['filtered_resps'], want['zt_ppl'][i]['filtered_resps']
    ll, ref_ll = (float(x[0] if isinstance(x, list) else x) for x in (ll, ref_ll))
    assert abs(ll - ref_ll) <= ppl_rel * abs(ref_ll), (i, ll, ref_ll)
  assert results['zh_mc']['acc,none'] == want_results['zh_mc']['acc,none']
  assert results['zt_gen']['exact_match,none'] == want_results['zt_gen']['exact_match,none']


@pytest.fixture(scope='module')
def model(tiny_data, tmp_path_factory):
  """(workdir, export dir) of a random tiny model: vocab 1000 unpadded, context 64, no
  repetition penalty in its generation_config (HF's generate would apply it)."""
  config = copy.deepcopy(tiny_data.config)
  config.model.vocab_multiple = 8
  config.sample.repetition_penalty = 1.0
  root = tmp_path_factory.mktemp('harness')
  workdir = random_workdir(config, os.path.join(tiny_data.data_dir, 'tokenizer'),
                           str(root / 'model'), seq_len=64)
  return workdir, export.export_workdir(workdir, str(root / 'model-hf'))


@pytest.fixture(scope='module')
def tasks(tmp_path_factory):
  return write_tasks(str(tmp_path_factory.mktemp('tasks')))


def hf_run(model, tasks, max_length=None):
  """lm_eval --model hf on the export, in this process: (samples {task: {doc_id: sample}},
  results)."""
  import lm_eval
  args = dict(pretrained=model[1], dtype='float32', device='cpu')
  if max_length:
    args['max_length'] = max_length
  out = lm_eval.simple_evaluate(
      model='hf', model_args=args, tasks=TASKS.split(','),
      task_manager=harness.task_manager(tasks['path'], tasks['data']), num_fewshot=1,
      log_samples=True, batch_size=16)
  samples = out.pop('samples')
  return {t: {r['doc_id']: r for r in rows} for t, rows in samples.items()}, out['results']


@pytest.fixture(scope='module')
def hf(model, tasks):
  return hf_run(model, tasks)


def run_main(*args, timeout=600):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), *args], env=env,
                        capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- score.py

def test_scores_are_the_log_softmax_of_the_models_logits(model):
  cfg, params, _, _, _ = checkpoint.load_model(model[0])
  rng = np.random.RandomState(0)
  rows = [list(rng.randint(0, cfg.real_vocab_size, n)) for n in (1, 2, 17, 40, 65, 33)]
  scored = score.score_rows(cfg, params, rows, top_n=5, tokens=64)   # several calls
  for row, s in zip(rows, scored):
    inputs = jnp.array([row[:cfg.seq_len]])
    logits = model_lib.GPT(cfg).apply({'params': params}, inputs)[0][0]
    want = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    n = len(row)
    assert s.logprobs.shape == (n,) and np.isnan(s.logprobs[0])
    np.testing.assert_allclose(s.logprobs[1:], want[np.arange(n - 1), row[1:]], atol=1e-5)
    np.testing.assert_array_equal(s.greedy[1:], want[:n - 1].argmax(-1) == row[1:])
    np.testing.assert_array_equal(s.top_ids[1:], np.argsort(-want[:n - 1], axis=-1)[:, :5])
    np.testing.assert_allclose(s.top_logprobs[1:], -np.sort(-want[:n - 1], axis=-1)[:, :5],
                               atol=1e-5)
  with pytest.raises(ValueError, match='row 0 has 66 tokens; scoring takes 1 to 65'):
    score.score_rows(cfg, params, [[1] * 66])


def test_tails_score_the_continuation_only_and_shared_inputs_once(model):
  """tails: a row's last n tokens, the entries of its whole-row scores; rows whose inputs are
  the same (four one-token answers after one question) get their own last tokens' scores."""
  cfg, params, _, _, _ = checkpoint.load_model(model[0])
  rng = np.random.RandomState(1)
  question = list(rng.randint(0, cfg.real_vocab_size, 30))
  rows = [question + [a] for a in (5, 6, 7, 8)] + [
      list(rng.randint(0, cfg.real_vocab_size, n)) for n in (2, 17, 40, 65)]
  tails = [1, 1, 1, 1, 1, 9, 39, 64]
  whole = score.score_rows(cfg, params, rows, top_n=3)
  tail = score.score_rows(cfg, params, rows, top_n=3, tails=tails, tokens=256)
  for s, t, n in zip(whole, tail, tails):
    assert t.logprobs.shape == (n,) and t.top_ids.shape == (n, 3)
    np.testing.assert_allclose(t.logprobs, s.logprobs[-n:], atol=1e-5)
    np.testing.assert_array_equal(t.greedy, s.greedy[-n:])
    np.testing.assert_array_equal(t.top_ids, s.top_ids[-n:])
  assert len({float(t.logprobs[0]) for t in tail[:4]}) == 4   # each choice its own token
  assert [t.logprobs.shape for t in score.score_rows(cfg, params, [[3], [3, 4]], tails=[0, 0])
          ] == [(0,), (0,)]
  with pytest.raises(ValueError, match='row 0 has 2 tokens; .*, and a tail of 0 to 1'):
    score.score_rows(cfg, params, [[3, 4]], tails=[2])


# ---------------------------------------------------------------- native against --model hf

def test_main_py_eval_tasks_equals_lm_eval_hf(model, tasks, hf, tmp_path):
  out = run_main('eval', '--workdir', model[0], '--tasks', TASKS, '--num_fewshot', '1',
                 '--task_path', tasks['path'], '--task_data', tasks['data'])
  assert out.returncode == 0, out.stderr[-3000:]
  assert '|zh_mc ' in out.stdout and 'acc' in out.stdout and 'bits_per_byte' in out.stdout
  written = os.path.join(model[0], 'lm_eval')
  assert f'written to {written}' in out.stdout
  assert_same_as_hf(read_samples(written), hf[0], read_results(written), hf[1])


def test_task_mistakes_are_one_line(model, tmp_path):
  out = run_main('eval', '--workdir', model[0], '--tasks', 'zh_mc,no_such_task')
  assert out.returncode == 2 and out.stderr == (
      "main.py: error: --tasks: unknown task 'no_such_task' (ours: zh_mc, zh_sentiment, "
      "zh_sentiment_chat; `lm_eval ls tasks` lists lm_eval's)\n"), out.stderr
  for kw, message in [
      (dict(), 'zh_mc reads a local directory: main.py eval --task_data DIR'),
      (dict(data_dir=str(tmp_path)), 'zh_mc: no answered question in'),
      (dict(data_dir=str(tmp_path / 'nope')), '--task_data '),
      (dict(task_path=str(tmp_path / 'nope')), '--task_path ')]:
    with pytest.raises(UserError, match=message):
      harness.evaluate_tasks(model[0], 'zh_mc', limit=2, out_dir=str(tmp_path / 'out'), **kw)
  assert not os.path.exists(tmp_path / 'out')
  # Without lm_eval: one line naming the pip command (a stand-in package that fails to import).
  fake = tmp_path / 'fake' / 'lm_eval'
  fake.mkdir(parents=True)
  (fake / '__init__.py').write_text('raise ImportError("no lm_eval here")\n')
  env = dict(os.environ, PYTHONPATH=f'{fake.parent}{os.pathsep}{ROOT}', JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), 'eval', '--workdir',
                        model[0], '--tasks', 'zh_mc'], env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 2 and out.stderr == (
      'main.py: error: --tasks needs EleutherAI\'s lm-evaluation-harness: '
      f'{harness.INSTALL}\n'), out.stderr


# ---------------------------------------------------------------- the tasks' data

def test_zh_mc_reads_the_ceval_cmmlu_and_jsonl_layouts(tmp_path):
  ceval = tmp_path / 'ceval'
  for split, answer in (('dev', 'A'), ('val', 'B'), ('test', '')):
    (ceval / split).mkdir(parents=True)
    (ceval / split / f'law_{split}.csv').write_text(
        'id,question,A,B,C,D,answer,explanation\n'
        f'0,问题一,甲,乙,丙,丁,{answer},因为\n1,问题二,甲,乙,丙,,{answer},\n', encoding='utf-8')
  (ceval / 'subject_mapping.json').write_text('{"law": ["Law", "法学", "Humanities"]}',
                                              encoding='utf-8')
  lines = []
  data = eval_tasks.load_mc(str(ceval), report=lines.append)
  assert list(data['eval']) == [dict(question='问题一', A='甲', B='乙', C='丙', D='丁',
                                     answer='B', subject='法学')]
  assert data['dev'][0]['answer'] == 'A'
  assert len(lines) == 3 and all('skipped' in x for x in lines)   # the empty D; test's answers
  cmmlu = tmp_path / 'cmmlu'
  (cmmlu / 'test').mkdir(parents=True)
  (cmmlu / 'test' / 'agronomy.csv').write_text(
      ',Question,A,B,C,D,Answer\n0,农学问题,一,二,三,四,d\n', encoding='utf-8')
  data = eval_tasks.load_mc(str(cmmlu), report=lines.append)
  assert data['eval'][0]['answer'] == 'D' and data['eval'][0]['subject'] == ''
  assert list(data['dev']) == list(data['eval'])
  flat = tmp_path / 'flat'
  flat.mkdir()
  (flat / 'mine.jsonl').write_text(
      json.dumps(dict(question='几？', choices=['1', '2', '3', '4'], answer=2)) + '\nnot json\n',
      encoding='utf-8')
  data = eval_tasks.load_mc(str(flat), report=lines.append)
  assert data['eval'][0]['C'] == '3' and data['eval'][0]['answer'] == 'C'
  assert lines[-1] == f'zh_mc: skipped 1 rows without a question, four options and an answer ' \
                      f'A-D in {flat / "mine.jsonl"}'


def test_the_sentiment_tasks_run_on_the_model(model, tmp_path):
  out = harness.evaluate_tasks(model[0], 'zh_sentiment,zh_sentiment_chat', limit=6,
                               out_dir=str(tmp_path))
  for task, prompt in (('zh_sentiment', '评论：'), ('zh_sentiment_chat', '<|im_start|>user\n')):
    assert 0 <= out['results'][task]['acc,none'] <= 1
    rows = out['samples'][task]
    (ctx, neg), (_, pos) = rows[0]['arguments']   # in-process: (context, continuation) a choice
    assert len(rows) == 6 and ctx.startswith(prompt) and (neg, pos) == ('负面', '正面')
  assert read_results(str(tmp_path))['zh_sentiment']['alias'] == 'zh_sentiment'


def test_the_sentiment_tasks_are_the_builtin_heldout_reviews():
  data = eval_tasks.load_sentiment()
  assert len(data['eval']) == 1000 and [d['label'] for d in data['eval']][:4] == [1, 0, 1, 0]
  doc = data['eval'][0]
  assert doc['chat'].startswith('<|im_start|>user\n') and doc['review'] in doc['chat']
  assert doc['chat'].endswith('<|im_end|>\n<|im_start|>assistant\n')
  assert not {d['review'] for d in data['dev']} & {d['review'] for d in data['eval']}


def test_moe_rows_score_the_same_alone_and_batched():
  """score.exact: capacity blocks that never drop, so a batch's padding rows and other rows
  cannot push a row's tokens out of their experts."""
  from helpers import tiny_cfg
  cfg = tiny_cfg(mlp='moe')
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  rows = [list(range(1, 40)), [7, 8], [3] * 20]
  batched = score.score_rows(cfg, params, rows, top_n=2)
  for row, s in zip(rows, batched):
    alone = score.score_rows(cfg, params, [row], top_n=2)[0]
    np.testing.assert_allclose(s.logprobs[1:], alone.logprobs[1:], atol=1e-6)
    np.testing.assert_array_equal(s.top_ids, alone.top_ids)
