"""Fault injection: bad inputs, damaged checkpoints, full disks, errors during a save.

Every user mistake must end as exactly one `main.py: error: ...` line, exit code 2 and no
traceback; nothing of the user's may be lost; and the next correct command must succeed.
main.py runs in this process (`cli`): its flag parsing, dispatch and error path are the same
code a subprocess would run, at a fraction of the cost. One tiny run (`pristine`, 8 steps,
checkpoints at 4 and 8) is trained once and copied for every checkpoint case.

Disk full is simulated two ways: a 2.5 MB tmpfs as the workdir (ENOSPC; needs root and
CAP_SYS_ADMIN, skipped where `mount` is refused), and RLIMIT_FSIZE (EFBIG from the kernel
on the same writes; works anywhere).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from absl import flags

from zhgpt_jax import chat, checkpoint, corpus, export, metrics, sft_format, train
from zhgpt_jax.config import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import main  # pylint: disable=wrong-import-position

pytestmark = pytest.mark.slow  # end-to-end: runs, servers, kill trials (minutes); CI runs them

STEPS = 8
FLAGS = flags.FLAGS


# ----------------------------------------------------------------------------- helpers

def cli(*args) -> tuple[int, str, str]:
  """main.py with `args`, in this process: (exit code, stdout, stderr)."""
  if FLAGS.is_parsed():
    FLAGS.unparse_flags()
  for name in [n for n in FLAGS if n.startswith('config.')]:   # the last call's overrides
    delattr(FLAGS, name)
  out, err = io.StringIO(), io.StringIO()
  code = 0
  old_argv = sys.argv
  sys.argv = ['main.py', *args]   # config_flags reads the overrides from sys.argv
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      main.main(main.parse_flags(sys.argv))
  except SystemExit as e:
    code = e.code
  finally:
    sys.argv = old_argv
  return code, out.getvalue(), err.getvalue()


def user_error(result, *needles) -> str:
  """Asserts exit 2, one error line holding every needle, no traceback; returns the line."""
  code, out, err = result
  lines = [l for l in err.splitlines() if l.startswith('main.py: error:')]
  assert code == 2, (code, err[-2000:])
  assert len(lines) == 1, err[-2000:]
  assert 'Traceback' not in out + err, err[-3000:]
  for needle in needles:
    assert needle in lines[0], lines[0]
  return lines[0]


def ok(result) -> str:
  code, out, err = result
  assert code == 0, err[-3000:]
  assert 'Traceback' not in err, err[-3000:]
  return out


def last_line(text: str) -> str:
  return text.strip().splitlines()[-1]


def flat(config, *sections) -> list[str]:
  return [f'--config.{s}.{k}={v}' for s in sections for k, v in config[s].items()
          if not isinstance(v, dict) and k != 'moe']


def tree(path: str) -> dict[str, str]:
  """Every file under `path` and its sha256: what 'no data lost' compares."""
  out = {}
  for d, _, files in os.walk(path):
    for f in files:
      full = os.path.join(d, f)
      with open(full, 'rb') as fh:
        out[os.path.relpath(full, path)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def steps_of(workdir: str) -> list[int]:
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit())


def losses(workdir: str) -> dict[int, float]:
  return {r['step']: r['loss'] for r in metrics.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
          if r['split'] == 'train'}


@pytest.fixture(scope='module', autouse=True)
def compilation_cache(tmp_path_factory):
  """One persistent XLA cache for this module: each run's train step compiles once, not per run."""
  import jax
  from jax._src import compilation_cache as cc
  keys = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs')
  old = [getattr(jax.config, k) for k in keys]
  jax.config.update(keys[0], str(tmp_path_factory.mktemp('xla_cache')))
  jax.config.update(keys[1], 0)
  cc.reset_cache()
  yield
  for k, v in zip(keys, old):
    jax.config.update(k, v)
  cc.reset_cache()


@pytest.fixture(scope='module')
def base(tiny_data):
  """The run's config: the session's tiny corpus, 8 steps, checkpoints at 4 and 8."""
  c = tiny_data.config.copy_and_resolve_references()
  c.data.cache_dir = tiny_data.data_dir
  c.train.update(steps=STEPS, eval_every=4, ckpt_every=4, log_every=1, peak_flops=1e11,
                 sample_tokens=0, keep=3)
  return c


@pytest.fixture(scope='module')
def pristine(base, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('faults') / 'run')
  train.train_and_evaluate(base.copy_and_resolve_references(), workdir)
  assert steps_of(workdir) == [4, 8]
  return workdir


@pytest.fixture
def run_copy(pristine, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(pristine, workdir)
  return workdir


def base_args(base, workdir) -> list[str]:
  return ['--config', os.path.join(ROOT, 'configs', 'tiny.py') + ':gpt2', '--workdir', workdir,
          *flat(base, 'data', 'tokenizer', 'train', 'optim'),
          *[f'--config.model.{k}={base.model[k]}' for k in
            ('n_layer', 'n_head', 'd_model', 'seq_len', 'vocab_multiple', 'tie_embeddings')]]


# ----------------------------------------------------------------------------- config

TINY = os.path.join(ROOT, 'configs', 'tiny.py')


@pytest.mark.parametrize('args, needles', [
    (['--config', f'{os.path.join(ROOT, "configs", "base.py")}:huge'],
     ["unknown model preset 'huge'", 'tiny, small, medium, large, xl']),
    (['--config', TINY, '--config.tokenizer.min_frequency=-1'],
     ['config.tokenizer.min_frequency=-1: must be >= 0']),
    (['prepare', '--config', TINY, '--config.data.tokenize_workers=-1'],
     ['config.data.tokenize_workers=-1: must be >= 0']),
    (['--config', TINY, '--config.data.val_fraction=0'],
     ['config.data.val_fraction=0.0: must be > 0 for training']),
    (['--config', TINY, '--config.train.keep=0'], ['config.train.keep=0: must be > 0']),
    (['--config', TINY, '--config.init_from=/no/such/run'],
     ["config.init_from='/no/such/run': not a trained workdir"]),
    (['--config', TINY, '--config.init_from=hf:/no/such/model'],
     ["config.init_from='hf:/no/such/model': no HuggingFace model"]),
    (['prepare', '--config', TINY, '--config.tokenizer.path=/no/such/tok'],
     ['config.tokenizer.path: no tokenizer at /no/such/tok']),
    (['eval'], ['--config is required', 'is not a saved run (no config.json)']),
])
def test_bad_config_values_fail_before_any_work(args, needles, tmp_path):
  workdir = str(tmp_path / 'w')
  user_error(cli(*args, '--workdir', workdir), *needles)
  assert not os.path.exists(workdir)   # found before anything was prepared or written


def test_workdir_or_cache_dir_naming_a_file(tmp_path, tiny_data):
  afile = tmp_path / 'afile'
  afile.write_text('mine')
  user_error(cli('prepare', '--config', TINY, '--workdir', str(afile)),
             f'--workdir {afile} is a file')
  user_error(cli('prepare', '--config', TINY, '--workdir', str(tmp_path / 'w'),
                 f'--config.data.cache_dir={afile}'), f'config.data.cache_dir {afile} is a file')
  assert afile.read_text() == 'mine'
  # The next correct command: the same prepare with a directory (the cached data is reused).
  c = tiny_data.config
  ok(cli('prepare', '--config', TINY, '--workdir', str(tmp_path / 'w'),
         f'--config.data.cache_dir={tiny_data.data_dir}', *flat(c, 'data', 'tokenizer'),
         f'--config.data.cache_dir={tiny_data.data_dir}'))


@pytest.mark.parametrize('body, needles', [
    ('def get_config():\n  return [1, 2]\n', ['get_config() returned a list']),
    ('import ml_collections\ndef get_config():\n  return ml_collections.ConfigDict({"a": 1})\n',
     ['the config lacks a field']),
    ('def get_config(:\n', ['SyntaxError', 'bad_config.py']),
])
def test_config_file_that_is_not_a_config(body, needles, tmp_path):
  path = tmp_path / 'bad_config.py'
  path.write_text(body)
  line = user_error(cli('prepare', '--config', str(path), '--workdir', str(tmp_path / 'w')))
  assert any(n in line for n in needles), line


@pytest.mark.parametrize('text', ['{"model": {"n_layer": 2', '[1, 2, 3]', '', '\x00\xff garbage'])
def test_corrupt_workdir_config_json(run_copy, text):
  path = os.path.join(run_copy, 'config.json')
  good = open(path, encoding='utf-8').read()
  with open(path, 'w', encoding='utf-8', errors='surrogateescape') as f:
    f.write(text)
  before = tree(run_copy)
  user_error(cli('eval', '--workdir', run_copy), 'config.json')
  assert tree(run_copy) == before
  with open(path, 'w', encoding='utf-8') as f:
    f.write(good)
  assert last_line(ok(cli('eval', '--workdir', run_copy))).startswith('step 8: loss')


# ----------------------------------------------------------------------------- corpus

def prepare(tmp_path, corpus_spec, *extra):
  return cli('prepare', '--config', TINY, '--workdir', str(tmp_path / 'w'),
             f'--config.data.corpus={corpus_spec}', '--config.tokenizer.vocab_size=300',
             '--config.data.tokenize_workers=1', *extra)


NEWS = [f'第{i}条新闻：人民群众生活水平不断提高，各地经济稳步发展。' for i in range(80)]


def test_lone_surrogates_are_skipped_and_counted(tmp_path):
  path = tmp_path / 'a.jsonl'
  lines = [json.dumps({'text': t}, ensure_ascii=False) for t in NEWS]
  lines[3] = '{"text": "坏\\ud800字"}'      # valid JSON, not encodable text
  lines[7] = '{"text": "\\udfff"}'
  path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
  out = ok(prepare(tmp_path, str(path)))
  assert '2 lone surrogate' in out, out
  meta = json.loads((tmp_path / 'w' / 'data' / 'train' / 'meta.json').read_text())
  val = json.loads((tmp_path / 'w' / 'data' / 'val' / 'meta.json').read_text())
  assert meta['documents'] + val['documents'] == 78


def test_utf16_file_warns_and_a_wholly_unusable_corpus_is_one_line(tmp_path):
  (tmp_path / 'c').mkdir()
  (tmp_path / 'c' / 'good.txt').write_text('\n'.join(NEWS[:40]), encoding='utf-8')
  (tmp_path / 'c' / 'u16.txt').write_bytes('\n'.join(NEWS[40:]).encode('utf-16'))
  out = ok(prepare(tmp_path, str(tmp_path / 'c')))
  assert 'u16.txt' in out and 'looks mostly invalid -- is it UTF-8?' in out, out
  assert 'good.txt: ' not in out
  user_error(prepare(tmp_path, str(tmp_path / 'c' / 'u16.txt')), 'no usable documents')


def test_one_huge_document_is_split_by_piece(tmp_path):
  path = tmp_path / 'one.txt'
  path.write_text(''.join(NEWS * 5) + '\n', encoding='utf-8')   # one document, ~11k chars
  out = ok(prepare(tmp_path, str(path), '--config.data.max_doc_chars=200',
                   '--config.data.val_fraction=0.2'))
  train_meta = json.loads((tmp_path / 'w' / 'data' / 'train' / 'meta.json').read_text())
  val_meta = json.loads((tmp_path / 'w' / 'data' / 'val' / 'meta.json').read_text())
  assert train_meta['documents'] > 0 and val_meta['documents'] > 0, out
  assert train_meta['documents'] + val_meta['documents'] == -(-len(''.join(NEWS * 5)) // 200)


def test_empty_train_split_is_an_error_naming_the_cause(tmp_path):
  # A document whose hash puts it in val at val_fraction 0.9: all of the corpus is val.
  doc = next(t for t in NEWS if corpus.is_val(t, 0.9))
  (tmp_path / 'v.txt').write_text(doc + '\n', encoding='utf-8')
  user_error(prepare(tmp_path, str(tmp_path / 'v.txt'), '--config.data.val_fraction=0.9'),
             'the train split is empty', 'tokenizer would train on 0 characters')
  ok(prepare(tmp_path, str(tmp_path / 'v.txt'), '--config.data.val_fraction=0.01'))


@pytest.mark.parametrize('make, needles', [
    (lambda d: None, ['does not exist']),
    (lambda d: os.makedirs(d / 'empty_dir'), ['has no .jsonl/.json/.parquet/.txt (.gz/.zst too) files']),
    (lambda d: (d / 'cut.jsonl.gz').write_bytes(gzip.compress(b'{"text": "x"}\n' * 500)[:60]),
     ['cannot read']),
    (lambda d: (d / 'bad.jsonl').write_text('{not json\n[1]\n{"text": 5}\n'),
     ['no usable documents', '1 malformed JSON', "1 missing 'text'", "1 non-string 'text'"]),
])
def test_bad_corpus_files(make, needles, tmp_path):
  make(tmp_path)
  name = next((n for n in ('empty_dir', 'cut.jsonl.gz', 'bad.jsonl') if (tmp_path / n).exists()),
              'missing.jsonl')
  user_error(prepare(tmp_path, str(tmp_path / name)), *needles)


# ----------------------------------------------------------------------------- SFT data

@pytest.mark.parametrize('record, reason', [
    ({'messages': [{'role': ['user'], 'content': '你好'}, {'role': 'assistant', 'content': '好'}]},
     'unknown role'),
    ({'messages': [{'role': {'r': 1}, 'content': '你好'}, {'role': 'assistant', 'content': '好'}]},
     'unknown role'),
    ({'conversations': [{'from': ['human'], 'value': '你好'}, {'from': 'gpt', 'value': '好'}]},
     'unknown role'),
    ({'messages': [{'role': 'user', 'content': '坏\ud800'}, {'role': 'assistant', 'content': '好'}]},
     'with a lone surrogate'),
    ({'instruction': '翻译\udc80', 'output': 'x'}, 'with a lone surrogate'),
])
def test_bad_chat_records_are_skipped_and_counted(record, reason, tmp_path):
  path = tmp_path / 'chat.jsonl'
  good = {'messages': [{'role': 'user', 'content': '你好'}, {'role': 'assistant', 'content': '好'}]}
  path.write_text('\n'.join(json.dumps(r) for r in (good, record, good)) + '\n', encoding='utf-8')
  stats = sft_format.SftStats()
  kept = list(sft_format.read_conversations(str(path), stats))
  assert len(kept) == 2 and stats.skipped == 1
  assert f'skipped 1 {reason}' in stats.summary(), stats.summary()


def test_chat_input_that_is_not_utf8_is_skipped(pristine):
  cfg, params, tokenizer, config, _ = checkpoint.load_model(pristine)
  lines = iter([UnicodeDecodeError('utf-8', b'\xff', 0, 1, 'invalid start byte'), '你好'])

  def read(_):
    item = next(lines, None)
    if item is None:
      raise EOFError
    if isinstance(item, Exception):
      raise item
    return item

  written = []
  config.sample.update(temperature=0.0, max_new_tokens=4)
  history = chat.chat_loop(cfg, params, tokenizer, config.sample, read=read, write=written.append)
  assert written[0] == '(that line is not UTF-8 text; skipped)\n'
  assert [t['role'] for t in history] == ['user', 'assistant']


# ----------------------------------------------------------------------------- prompts

def test_prompt_file_faults(pristine, tmp_path):
  bad = tmp_path / 'gbk.txt'
  bad.write_bytes('村民们\n'.encode('utf-8') + '今天'.encode('gbk') + b'\n')
  user_error(cli('sample', '--workdir', pristine, '--prompt_file', str(bad)),
             f'--prompt_file {bad}: line 2 is not UTF-8 text')
  user_error(cli('sample', '--workdir', pristine, '--prompt_file', str(tmp_path)), 'is a directory')
  (tmp_path / 'blank.txt').write_text('\n \n', encoding='utf-8')
  user_error(cli('sample', '--workdir', pristine, '--prompt_file', str(tmp_path / 'blank.txt')),
             'no prompts in it')
  user_error(cli('sample', '--workdir', pristine, '--prompt', '坏\udcff'), 'not UTF-8 text')
  bad.write_text('村民们\n今天\n', encoding='utf-8')
  out = ok(cli('sample', '--workdir', pristine, '--prompt_file', str(bad),
               '--config.sample.max_new_tokens=3', '--config.sample.temperature=0'))
  assert out.startswith('村民们') and '\n今天' in out


def test_prompt_longer_than_the_context(pristine):
  long_prompt = '人民' * 200       # far more than the 64-token context
  user_error(cli('sample', '--workdir', pristine, '--prompt', long_prompt,
                 '--config.sample.max_new_tokens=8'),
             'exceeds the model', 'set sample.sliding=True')
  out = ok(cli('sample', '--workdir', pristine, '--prompt', long_prompt,
               '--config.sample.sliding=True', '--config.sample.max_new_tokens=3'))
  assert out.startswith(long_prompt)


# ----------------------------------------------------------------------------- export targets

@pytest.mark.parametrize('where', ['same', 'parent', 'inside', 'other_run', 'file', 'non_empty'])
def test_export_never_replaces_a_run(where, run_copy, pristine, tmp_path):
  outs = {'same': run_copy, 'parent': str(tmp_path), 'inside': os.path.join(run_copy, 'hf'),
          'other_run': pristine, 'file': str(tmp_path / 'notes' / 'keep.txt'),
          'non_empty': str(tmp_path / 'notes')}
  os.makedirs(tmp_path / 'notes')
  (tmp_path / 'notes' / 'keep.txt').write_text('mine')
  needles = {'same': 'is, contains or is inside the workdir',
             'parent': 'is, contains or is inside the workdir',
             'inside': 'is, contains or is inside the workdir',
             'other_run': 'is or is inside the workdir', 'file': 'not a directory',
             'non_empty': 'pass --overwrite'}
  before, before_other, notes = tree(run_copy), tree(pristine), tree(str(tmp_path / 'notes'))
  overwrite = [] if where == 'non_empty' else ['--overwrite']
  user_error(cli('export', '--workdir', run_copy, '--out', outs[where], *overwrite),
             needles[where])
  assert tree(run_copy) == before and tree(pristine) == before_other
  assert tree(str(tmp_path / 'notes')) == notes
  out = ok(cli('export', '--workdir', run_copy, '--out', str(tmp_path / 'hf')))
  assert {'config.json', 'model.safetensors'} <= set(os.listdir(tmp_path / 'hf')), out


# ----------------------------------------------------------------------------- hf: directories

@pytest.fixture(scope='module')
def hf_dir(pristine, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('hf') / 'model')
  export.export_workdir(pristine, out)
  return out


@pytest.mark.parametrize('damage, needles', [
    ('truncate_weights', ['cannot read the weights']),
    ('drop_field', ['config.json is not a usable config', 'KeyError', 'n_embd']),
    ('garble_config', ['config.json is not a usable config', 'JSONDecodeError']),
    ('no_weights', ['no weights in']),
])
def test_damaged_hf_directory(damage, needles, hf_dir, base, tmp_path):
  src = str(tmp_path / 'hf')
  shutil.copytree(hf_dir, src)
  weights, cfg_path = os.path.join(src, 'model.safetensors'), os.path.join(src, 'config.json')
  if damage == 'truncate_weights':
    os.truncate(weights, os.path.getsize(weights) // 2)
  elif damage == 'no_weights':
    os.remove(weights)
  elif damage == 'drop_field':
    cfg = json.loads(open(cfg_path).read())
    del cfg['n_embd']
    open(cfg_path, 'w').write(json.dumps(cfg))
  else:
    open(cfg_path, 'w').write('{"architectures": ["GPT2LMHeadModel"], n_embd')
  with pytest.raises(UserError) as e:
    export.import_hf(src)
  for needle in needles:
    assert needle in str(e.value), str(e.value)
  assert '\n' not in str(e.value)
  cfg, params = export.import_hf(hf_dir)    # the intact directory imports
  assert cfg.n_layer == base.model.n_layer and params


# ----------------------------------------------------------------------------- checkpoints

def _largest(step_dir):
  files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs
           if f != checkpoint.MANIFEST]
  return max(files, key=os.path.getsize)


def _damage(step_dir, how):
  if how == 'truncate':
    path = _largest(step_dir)
    os.truncate(path, os.path.getsize(path) // 2)
  elif how == 'bitflip':
    path = _largest(step_dir)
    with open(path, 'r+b') as f:
      f.seek(os.path.getsize(path) // 2)
      byte = f.read(1)
      f.seek(-1, 1)
      f.write(bytes([byte[0] ^ 0x10]))
  elif how == 'no_metadata':
    os.remove(os.path.join(step_dir, 'state', '_METADATA'))
  elif how == 'empty_meta':
    open(os.path.join(step_dir, 'meta', 'metadata'), 'w').close()
  elif how == 'empty_dir':
    shutil.rmtree(step_dir)
    os.makedirs(step_dir)
  elif how == 'unsealed_truncate':     # a step saved before manifests existed: orbax decides
    os.remove(os.path.join(step_dir, checkpoint.MANIFEST))
    path, cut = _inside_a_param(os.path.join(step_dir, 'state'))
    os.truncate(path, cut)


def _inside_a_param(state_dir):
  """(data file, offset) halfway through a `params` value of an orbax OCDBT item.

  Eval restores the params alone; which data file holds them (and whether the largest one
  does) depends on how orbax's writers interleaved. The item's b-tree, read with
  tensorstore's public `ocdbt.dump`, names the file and the byte range of every value.
  """
  import tensorstore as ts
  kv = ts.KvStore.open({'driver': 'file', 'path': state_dir + '/'}).result()
  version = ts.ocdbt.dump(kv).result()['versions'][-1]
  assert version['root_height'] == 0, version     # one leaf node: every value listed in it
  node = ts.ocdbt.dump(kv, version['root']['location']).result()
  refs = [e['indirect_value'] for e in node['entries']
          if e['key'].startswith(b'params.') and 'indirect_value' in e]
  assert refs, node['entries'][:3]
  _, prefix, name, offset, length = max(refs, key=lambda r: int(r.rsplit(':', 1)[1])).split(':')
  return os.path.join(state_dir, prefix, name), int(offset) + int(length) // 2


def _logged_val(workdir, step):
  return {r['step']: r['loss'] for r in metrics.read_metrics(
      os.path.join(workdir, 'metrics.jsonl')) if r['split'] == 'val'}[step]


@pytest.mark.parametrize('how', ['truncate', 'bitflip', 'no_metadata', 'empty_meta', 'empty_dir',
                                 'unsealed_truncate'])
def test_eval_falls_back_past_a_damaged_newest_step(how, run_copy):
  _damage(checkpoint.Checkpointer(run_copy, 3).step_dir(8), how)
  before = tree(run_copy)
  code, out, err = cli('eval', '--workdir', run_copy)
  ok((code, out, err))
  assert 'checkpoint step 8 is damaged' in err and 'using step 4' in err, err
  assert len([l for l in err.splitlines() if 'damaged' in l]) == 1
  assert 'Traceback' not in err and 'Event loop is closed' not in err
  line = out.strip().splitlines()[-1]
  assert line.startswith('step 4: loss ')
  assert float(line.split('loss ')[1].split(',')[0]) == pytest.approx(_logged_val(run_copy, 4),
                                                                      abs=6e-5)
  assert tree(run_copy) == before      # eval reads; it moves and deletes nothing


def test_sample_and_export_fall_back_and_explicit_step_is_refused(run_copy, tmp_path):
  _damage(os.path.join(run_copy, 'checkpoints', '8'), 'bitflip')
  code, out, err = cli('sample', '--workdir', run_copy, '--prompt', '人民',
                       '--config.sample.max_new_tokens=3')
  ok((code, out, err))
  assert 'using step 4' in err and out.startswith('人民')
  user_error(cli('eval', '--workdir', run_copy, '--step', '8'),
             'checkpoint step 8 is damaged', 'does not match its checksum', 'have [4, 8]')
  user_error(cli('eval', '--workdir', run_copy, '--step', '5'), 'no checkpoint at step 5')
  code, out, err = cli('export', '--workdir', run_copy, '--out', str(tmp_path / 'hf'))
  ok((code, out, err))
  assert 'using step 4' in err
  _, params4, _ = checkpoint.load_params(run_copy, 4)
  _, imported = export.import_hf(str(tmp_path / 'hf'))
  np.testing.assert_array_equal(imported['wte']['embedding'][:params4['wte']['embedding'].shape[0]],
                                params4['wte']['embedding'])


def test_no_intact_step_is_one_line(run_copy):
  _damage(os.path.join(run_copy, 'checkpoints', '8'), 'truncate')
  _damage(os.path.join(run_copy, 'checkpoints', '4'), 'no_metadata')
  before = tree(run_copy)
  user_error(cli('eval', '--workdir', run_copy), 'no intact checkpoint', 'steps 8, 4 are damaged')
  user_error(cli('sample', '--workdir', run_copy, '--prompt', '人民'), 'no intact checkpoint')
  assert tree(run_copy) == before


def test_init_from_falls_back_too(run_copy):
  _damage(os.path.join(run_copy, 'checkpoints', '8'), 'empty_meta')
  _, params, meta = checkpoint.load_params(run_copy)
  assert meta['step'] == 4


def test_damaged_newest_step_resume_matches_the_uninterrupted_run(base, pristine, run_copy):
  _damage(os.path.join(run_copy, 'checkpoints', '8'), 'truncate')
  with open(os.path.join(run_copy, 'metrics.jsonl'), 'a', encoding='utf-8') as f:
    f.write('{"step": 8, "split": "tr')    # a record torn by a kill
  args = base_args(base, run_copy)
  code, out, err = cli(*args)
  ok((code, out, err))
  assert 'step 8 is damaged' in err and 'using step 4' in err and 'moved the damaged step' in err
  assert 'resuming from step 4' in out
  # The damaged step is kept aside, never deleted; the redone step 8 is whole again.
  assert os.listdir(os.path.join(run_copy, checkpoint.DAMAGED)) == ['8']
  assert steps_of(run_copy) == [4, 8]
  # Metrics past step 4 were dropped before the redo: one record a step, equal bit for bit.
  records = [r for r in metrics.read_metrics(os.path.join(run_copy, 'metrics.jsonl'))
             if r['split'] == 'train']
  assert [r['step'] for r in records] == list(range(1, STEPS + 1))
  assert losses(run_copy) == losses(pristine)
  assert last_line(ok(cli('eval', '--workdir', run_copy))).startswith('step 8: loss')


# ----------------------------------------------------------------------------- full disk

@contextlib.contextmanager
def _tmpfs(path: str, size: str):
  os.makedirs(path, exist_ok=True)
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', path],
                    capture_output=True).returncode:
    pytest.skip('cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)')
  try:
    yield path
  finally:
    subprocess.run(['umount', '-l', path], check=False)


@contextlib.contextmanager
def _file_size_limit(n_bytes: int):
  old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
  old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # EFBIG instead of a kill
  resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, old_limit[1]))
  try:
    yield
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
    signal.signal(signal.SIGXFSZ, old_handler)


@pytest.mark.parametrize('fault', ['enospc_tmpfs', 'efbig_rlimit'])
def test_failed_save_stops_at_once_and_keeps_the_last_good_step(fault, base, pristine, tmp_path):
  args_of = lambda w: base_args(base, w) + ['--config.train.keep=1']
  if fault == 'enospc_tmpfs':
    # Room for the run files and one checkpoint (~2 MB), not two. keep=1: orbax's own policy
    # would delete step 4 when the save of step 8 starts, and lose it when that save fails.
    with _tmpfs(str(tmp_path / 'mnt'), '3200k') as mnt:
      workdir = os.path.join(mnt, 'run')
      result = cli(*args_of(workdir))
      line = user_error(result, 'step 8: saving the checkpoint failed (No space left on device)',
                        f'The last good checkpoint is step 4 in {workdir}/checkpoints')
      kept = tree(os.path.join(workdir, 'checkpoints'))
      saved = str(tmp_path / 'saved')
      shutil.copytree(workdir, saved)
  else:
    workdir = saved = str(tmp_path / 'run')
    with _file_size_limit(600_000):     # the run's files fit; the checkpoint's state does not
      result = cli(*args_of(workdir))
    line = user_error(result, 'saving the checkpoint failed (File too large)',
                      'The last good checkpoint is none')
    kept = tree(os.path.join(workdir, 'checkpoints'))
  assert 'Traceback' not in result[2] and 'cannot schedule new futures' not in result[2]
  assert 'run the same command to resume' in line
  # Training stopped at once: no train record past the step that could not be saved.
  assert max(losses(saved)) <= STEPS
  # The partial save is never listed as a step (it stays a tmp directory at most, which the
  # next start removes); with room again, the same command resumes and ends where the
  # uninterrupted run ended.
  assert all(p.split(os.sep)[0].isdigit() or 'orbax-checkpoint-tmp' in p for p in kept)
  ok(cli(*args_of(saved)))
  assert losses(saved) == losses(pristine)
  assert not any('orbax-checkpoint-tmp' in n for n in os.listdir(os.path.join(saved, 'checkpoints')))


# ----------------------------------------------------------------------------- errors in the loop

def test_error_inside_the_loop_waits_for_the_save_in_flight(base, pristine, tmp_path, monkeypatch):
  calls = []
  real = train._check

  def failing_check(step, metrics, dp, nonfinite, limit, writer):
    calls.append(step)
    if step == 5:    # step 4's async save was started just before
      raise UserError('3 consecutive non-finite steps (train.max_nonfinite=3); stopped')
    return real(step, metrics, dp, nonfinite, limit, writer)

  monkeypatch.setattr(train, '_check', failing_check)
  workdir = str(tmp_path / 'run')
  result = cli(*base_args(base, workdir))
  user_error(result, 'consecutive non-finite steps')
  assert 'cannot schedule new futures' not in result[2] and 'Traceback' not in result[2]
  assert steps_of(workdir) == [4]          # the save in flight was finished, and sealed
  assert checkpoint.damage(os.path.join(workdir, 'checkpoints', '4')) is None
  assert os.path.exists(os.path.join(workdir, 'checkpoints', '4', checkpoint.MANIFEST))
  monkeypatch.setattr(train, '_check', real)
  ok(cli(*base_args(base, workdir)))
  assert losses(workdir) == losses(pristine)


# ============================================================================= round two
# The doors added since the first round: config files that raise, corpus weights, a full or
# read-only disk under prepare / SFT rows / export / the training logs / the compile cache,
# hf: directories whose config.json disagrees with their weights, and the server.

def _remount(path: str, options: str) -> None:
  subprocess.run(['mount', '-o', f'remount,{options}', path], check=True, capture_output=True)


@contextlib.contextmanager
def _read_only_view(source: str, path: str):
  """`source` seen read-only at `path` (a read-only bind mount: root ignores chmod)."""
  os.makedirs(path, exist_ok=True)
  if subprocess.run(['mount', '--bind', source, path], capture_output=True).returncode:
    pytest.skip('cannot bind-mount here (needs root with CAP_SYS_ADMIN)')
  try:
    _remount(path, 'bind,ro')
    yield path
  finally:
    subprocess.run(['umount', '-l', path], check=False)


# ----------------------------------------------------------------------------- config files

GOOD_CONFIG = open(TINY, encoding='utf-8').read()


@pytest.mark.parametrize('body, needles', [
    ('from zhgpt_jax.config import default_config\ndef get_config():\n'
     '  c = default_config("tiny")\n  raise ValueError("steps must be even")\n',
     ['line 4: ValueError: steps must be even']),
    ('x = 1 / 0\ndef get_config():\n  return None\n', ['line 1: ZeroDivisionError: division by zero']),
    ('def get_config():\n  return {}["model"]\n', ["line 2: KeyError: 'model'"]),
    ('def get_config(:\n', ['line 1: SyntaxError: invalid syntax']),
    ('def get_config():\n  return open("/no/such/file").read()\n',
     ['line 2: FileNotFoundError', '/no/such/file']),
])
def test_config_file_that_raises_is_its_own_message_and_line(body, needles, tmp_path, tiny_data):
  path = tmp_path / 'mine.py'
  path.write_text(body)
  line = user_error(cli('prepare', '--config', str(path), '--workdir', str(tmp_path / 'w')),
                    f'--config {path}: ', *needles)
  assert 'Error whilst parsing' not in line and 'File "' not in line and '^^^' not in line
  assert not (tmp_path / 'w').exists() and path.read_text() == body
  path.write_text(GOOD_CONFIG)    # fixed: the same command runs (the cached data is reused)
  ok(cli('prepare', '--config', str(path), '--workdir', str(tmp_path / 'w'),
         *flat(tiny_data.config, 'data', 'tokenizer'), f'--config.data.cache_dir={tiny_data.data_dir}'))


@pytest.fixture(scope='module')
def weights_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp('weights_cache'))


@pytest.mark.parametrize('weight', ['-1', '0', 'abc', '', '1e999', 'nan'])
def test_a_corpus_weight_that_is_not_a_positive_number(weight, tmp_path, weights_cache):
  path = tmp_path / 'a.jsonl'
  path.write_text('\n'.join(json.dumps({'text': t}, ensure_ascii=False) for t in NEWS) + '\n',
                  encoding='utf-8')
  before = tree(str(tmp_path))
  line = user_error(prepare(tmp_path, f'{path}:{weight}', f'--config.data.cache_dir={weights_cache}'),
                    f'config.data.corpus: the weight of {path} must be a number > 0',
                    f'not {weight!r}')
  assert 'does not exist' not in line
  assert tree(str(tmp_path)) == before
  ok(prepare(tmp_path, f'{path}:2', f'--config.data.cache_dir={weights_cache}'))


# ----------------------------------------------------------------------------- prepare: disk faults

BIG_NEWS = [f'{t}{i}号文件指出，要坚持改革开放，推动高质量发展。' * 3 for i in range(1500) for t in NEWS[:1]]


@pytest.fixture(scope='module')
def big_corpus(tmp_path_factory):
  """~400 KB of text: its scan scratch and shards outgrow a 100 KB file size limit."""
  path = tmp_path_factory.mktemp('big') / 'big.jsonl'
  path.write_text('\n'.join(json.dumps({'text': t}, ensure_ascii=False) for t in BIG_NEWS) + '\n',
                  encoding='utf-8')
  return str(path)


def _prepare_into(cache: str, corpus_path: str):
  return cli('prepare', '--config', TINY, '--workdir', os.path.join(os.path.dirname(cache), 'w'),
             f'--config.data.corpus={corpus_path}', '--config.tokenizer.vocab_size=300',
             '--config.data.tokenize_workers=1', f'--config.data.cache_dir={cache}')


@pytest.mark.parametrize('fault', ['enospc_tmpfs', 'efbig_rlimit', 'read_only_remount',
                                   'cache_under_a_file'])
def test_prepare_on_a_full_or_read_only_disk(fault, big_corpus, tmp_path):
  corpus_before = tree(os.path.dirname(big_corpus))
  with contextlib.ExitStack() as stack:
    if fault == 'efbig_rlimit':
      cache = str(tmp_path / 'cache')
      with _file_size_limit(100_000):
        line = user_error(_prepare_into(cache, big_corpus), 'prepare failed (File too large')
    elif fault == 'cache_under_a_file':
      (tmp_path / 'afile').write_text('mine')
      cache = str(tmp_path / 'afile' / 'cache')
      line = user_error(_prepare_into(cache, big_corpus), 'prepare failed (Not a directory')
      assert (tmp_path / 'afile').read_text() == 'mine'
      cache = str(tmp_path / 'cache')
    else:
      mnt = stack.enter_context(_tmpfs(str(tmp_path / 'mnt'), '300k'))
      cache = os.path.join(mnt, 'cache')
      if fault == 'read_only_remount':
        _remount(mnt, 'ro')
      line = user_error(_prepare_into(cache, big_corpus),
                        'prepare failed (' + ('No space left on device' if fault == 'enospc_tmpfs'
                                              else 'Read-only file system'))
      _remount(mnt, 'rw,size=50m')    # room again: the same command continues and finishes
    assert 'prepare stopped' in line and 'run the same command' in line
    for n in ('train', 'val'):   # nothing half-written was sealed
      assert not os.path.exists(os.path.join(cache, n, 'meta.json'))
    out = ok(_prepare_into(cache, big_corpus))
    assert 'tokens' in out
    meta = json.load(open(os.path.join(cache, 'train', 'meta.json'), encoding='utf-8'))
    if fault == 'read_only_remount':   # a prepared cache on a read-only mount is used as it is
      _remount(mnt, 'ro')
      ok(_prepare_into(cache, big_corpus))
  assert meta['documents'] > 1000
  assert tree(os.path.dirname(big_corpus)) == corpus_before


def test_sft_rows_on_a_read_only_or_full_cache(tiny_data, tmp_path):
  from zhgpt_jax import sft_shards, tokenizer as tok_lib
  chat_path = tmp_path / 'chat.jsonl'
  chat_path.write_text('\n'.join(json.dumps(dict(messages=[
      {'role': 'user', 'content': t[:12]}, {'role': 'assistant', 'content': t[12:30]}]),
      ensure_ascii=False) for t in NEWS * 20) + '\n', encoding='utf-8')
  config = tiny_data.config.copy_and_resolve_references()
  config.task, config.sft.data = 'sft', str(chat_path)
  tok = tok_lib.load_tokenizer(os.path.join(tiny_data.data_dir, 'tokenizer'))
  with _tmpfs(str(tmp_path / 'mnt'), '2m') as mnt:
    _remount(mnt, 'ro')
    with pytest.raises(UserError) as e:
      sft_shards.cached_rows(config, os.path.join(mnt, 'data'), tok)
    assert 'building the SFT rows failed (Read-only file system' in str(e.value)
    _remount(mnt, 'rw,size=8k')
    with pytest.raises(UserError) as e:
      sft_shards.cached_rows(config, os.path.join(mnt, 'data'), tok)
    assert 'building the SFT rows failed (No space left on device' in str(e.value)
    assert 'Nothing half-written is kept' in str(e.value) and '\n' not in str(e.value)
    assert not [n for n in os.listdir(os.path.join(mnt, 'data', 'sft')) if '.tmp-' in n]
    _remount(mnt, 'rw,size=20m')
    rows, meta, reused = sft_shards.cached_rows(config, os.path.join(mnt, 'data'), tok)
    assert not reused and len(rows['train']['inputs']) > 0


# ----------------------------------------------------------------------------- export: disk faults

@pytest.mark.parametrize('fault', ['enospc_tmpfs', 'efbig_rlimit', 'read_only_bind'])
def test_export_on_a_full_or_read_only_disk(fault, pristine, tmp_path):
  before = tree(pristine)
  (tmp_path / 'target').mkdir()
  (tmp_path / 'target' / 'keep.txt').write_text('mine')
  with contextlib.ExitStack() as stack:
    if fault == 'efbig_rlimit':
      out = str(tmp_path / 'hf')
      with _file_size_limit(100_000):
        line = user_error(cli('export', '--workdir', pristine, '--out', out),
                          'export failed (File too large')
    elif fault == 'read_only_bind':
      view = stack.enter_context(_read_only_view(str(tmp_path / 'target'), str(tmp_path / 'ro')))
      out = os.path.join(view, 'hf')
      line = user_error(cli('export', '--workdir', pristine, '--out', out),
                        'export failed (Read-only file system')
    else:
      mnt = stack.enter_context(_tmpfs(str(tmp_path / 'mnt'), '100k'))
      out = os.path.join(mnt, 'hf')
      line = user_error(cli('export', '--workdir', pristine, '--out', out),
                        'export failed (No space left on device')
      assert os.listdir(mnt) == []      # the partial export was removed
    assert 'the partial export was removed' in line and not os.path.exists(out)
    assert tree(str(tmp_path / 'target')) == {'keep.txt': tree(str(tmp_path / 'target'))['keep.txt']}
    assert (tmp_path / 'target' / 'keep.txt').read_text() == 'mine'
  assert tree(pristine) == before
  ok(cli('export', '--workdir', pristine, '--out', str(tmp_path / 'hf2')))
  assert os.path.isfile(tmp_path / 'hf2' / 'model.safetensors')


# ----------------------------------------------------------------------------- training: its logs, the compile cache

@pytest.mark.parametrize('fault, needles', [
    ('metrics_is_a_directory', ['training failed (Is a directory', 'metrics.jsonl']),
    ('tb_is_a_file', ['training failed (Not a directory', 'tb']),
])
def test_training_logs_that_cannot_be_written(fault, needles, base, run_copy):
  path = os.path.join(run_copy, 'metrics.jsonl' if fault == 'metrics_is_a_directory' else 'tb')
  aside = path + '.aside'
  os.rename(path, aside)
  if fault == 'metrics_is_a_directory':
    os.makedirs(path)
  else:
    open(path, 'w').close()
  before = tree(os.path.join(run_copy, 'checkpoints'))
  line = user_error(cli(*base_args(base, run_copy)), *needles)
  assert 'training stopped. The last good checkpoint is step 8' in line
  assert tree(os.path.join(run_copy, 'checkpoints')) == before
  (shutil.rmtree if os.path.isdir(path) else os.remove)(path)
  os.rename(aside, path)
  ok(cli(*base_args(base, run_copy)))
  assert last_line(ok(cli('eval', '--workdir', run_copy))).startswith('step 8: loss')


def test_auto_compile_cache_on_a_read_only_data_dir_warns_and_compiles(tmp_path, capsys,
                                                                       monkeypatch):
  import jax
  from zhgpt_jax import parallel
  current = jax.config.jax_compilation_cache_dir
  monkeypatch.setitem(parallel._COMPILE_CACHE, 'dir', current)   # 'auto' then picks its own
  with _tmpfs(str(tmp_path / 'mnt'), '1m') as mnt:
    _remount(mnt, 'ro')
    try:
      assert parallel.use_compile_cache('auto', mnt) == ''
    finally:
      parallel.use_compile_cache(current, '')    # the module's cache again
  out = capsys.readouterr().out
  assert f'warning: the compilation cache {mnt}/jax_cache is not writable (Read-only file system)' \
      in out and 'Traceback' not in out
  assert jax.config.jax_compilation_cache_dir == current


def test_a_compile_cache_that_cannot_be_written(base, run_copy, tmp_path):
  with _tmpfs(str(tmp_path / 'mnt'), '1m') as mnt:
    _remount(mnt, 'ro')
    user_error(cli(*base_args(base, run_copy), f'--config.train.compile_cache={mnt}/jax'),
               f"config.train.compile_cache='{mnt}/jax': cannot write there (Read-only file system)")
  import jax
  ok(cli(*base_args(base, run_copy),      # the module's cache: the one the run used
         f'--config.train.compile_cache={jax.config.jax_compilation_cache_dir}'))


# ----------------------------------------------------------------------------- hf: directories

@pytest.fixture(scope='module')
def hf_models(tiny_data, tmp_path_factory):
  """Random checkpoints saved by transformers' own save_pretrained (tests/hf_checkpoints.py)."""
  import hf_checkpoints
  root = tmp_path_factory.mktemp('hf_models')
  texts = hf_checkpoints.corpus_texts(tiny_data.corpus_dir)
  dirs = {kind: hf_checkpoints.build(kind, str(root / kind), texts)
          for kind in ('gpt2', 'llama', 'qwen2_moe')}
  # The same GPT-2 as a pytorch_model.bin (transformers 5 saves only safetensors), and split
  # into two safetensors shards with an index, as large checkpoints come.
  import torch
  import transformers
  from safetensors.numpy import load_file, save_file
  tensors = load_file(os.path.join(dirs['gpt2'], 'model.safetensors'))
  for kind in ('gpt2_bin', 'gpt2_sharded'):
    dirs[kind] = str(root / kind)
    shutil.copytree(dirs['gpt2'], dirs[kind], ignore=shutil.ignore_patterns('model.safetensors'))
  model = transformers.GPT2LMHeadModel.from_pretrained(dirs['gpt2'])
  torch.save(model.state_dict(), os.path.join(dirs['gpt2_bin'], 'pytorch_model.bin'))
  names = sorted(tensors)
  weight_map = {}
  for i, part in enumerate((names[:len(names) // 2], names[len(names) // 2:])):
    shard = f'model-0000{i + 1}-of-00002.safetensors'
    save_file({k: tensors[k] for k in part}, os.path.join(dirs['gpt2_sharded'], shard),
              metadata={'format': 'pt'})
    weight_map.update({k: shard for k in part})
  with open(os.path.join(dirs['gpt2_sharded'], 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {}, 'weight_map': weight_map}, f)
  return dirs


@pytest.fixture(scope='module')
def hf_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp('hf_cache'))


@pytest.mark.parametrize('kind, edit, needles', [
    ('gpt2', dict(n_embd=96), ['tensor transformer.h.0.attn.c_attn.bias has shape [192]',
                               'implies [288] (d_model=96']),
    ('gpt2', dict(n_layer=3), ['the weights lack tensor transformer.h.2.', 'n_layer=3']),
    ('gpt2', dict(vocab_size=2000), ['tensor transformer.wte.weight has shape [',
                                     'vocab_size=2000']),
    ('gpt2', dict(n_embd=None), ["config.json lacks the field 'n_embd'"]),
    ('llama', dict(intermediate_size=100), ['mlp.down_proj.weight has shape [64, 96]',
                                            'implies [64, 100]']),
    ('llama', dict(num_key_value_heads=4), ['self_attn.k_proj.weight has shape [32, 64]']),
    ('llama', dict(hidden_size='64'), ["config.json has hidden_size='64'",
                                       'must be a positive integer']),
    ('qwen2_moe', dict(hidden_size=96), ['has shape', 'd_model=96']),
    ('qwen2_moe', dict(num_experts=8), ['mlp.gate.weight has shape [4, 64]', 'implies [8, 64]']),
    ('gpt2_bin', dict(n_embd=96), ['tensor transformer.wte.weight has shape [500, 64]',
                                   'implies [500, 96]']),
    ('gpt2_sharded', dict(vocab_size=2000), ['tensor transformer.wte.weight has shape [',
                                             'vocab_size=2000']),
    ('gpt2_sharded', 'drop_shard', ['cannot read the weights in', 'model-00002-of-00002',
                                    'is the download complete?']),
])
def test_hf_directory_whose_config_disagrees_with_its_weights(kind, edit, needles, hf_models,
                                                              tiny_data, hf_cache, tmp_path):
  src = str(tmp_path / kind)
  shutil.copytree(hf_models[kind], src)
  cfg_path = os.path.join(src, 'config.json')
  good = open(cfg_path, encoding='utf-8').read()
  cfg = json.loads(good)
  shard = os.path.join(src, 'model-00002-of-00002.safetensors')
  if edit == 'drop_shard':     # a download that stopped before its last shard
    os.rename(shard, shard + '.part')
  for key, value in (edit.items() if isinstance(edit, dict) else ()):
    if value is None:
      del cfg[key]
    else:
      cfg[key] = value
  with open(cfg_path, 'w', encoding='utf-8') as f:
    json.dump(cfg, f)
  before = tree(src)
  prepare_args = ('prepare', '--config', TINY, '--workdir', str(tmp_path / 'w'),
                  f'--config.init_from=hf:{src}', *flat(tiny_data.config, 'data'),
                  f'--config.data.cache_dir={hf_cache}', '--config.model.seq_len=64')
  # Found before any data is built (init_from) and before any weight is loaded (serve).
  user_error(cli(*prepare_args), f'init_from=hf:{src}: ', *needles)
  assert not os.path.exists(tmp_path / 'w')
  from serving import free_port
  user_error(cli('serve', '--workdir', f'hf:{src}', '--port', str(free_port())),
             f'--workdir hf:{src}: ', *needles)
  assert tree(src) == before
  with open(cfg_path, 'w', encoding='utf-8') as f:   # the intact directory: the same commands run
    f.write(good)
  if edit == 'drop_shard':
    os.rename(shard + '.part', shard)
  ok(cli(*prepare_args))


# ----------------------------------------------------------------------------- the server

@pytest.fixture(scope='module')
def served(tiny_data, tmp_path_factory):
  """`main.py serve` on a random-weight tiny model (tests/serving.py), for the whole module."""
  from serving import Served, random_workdir
  workdir = random_workdir(tiny_data.config, os.path.join(tiny_data.data_dir, 'tokenizer'),
                           str(tmp_path_factory.mktemp('served') / 'model'))
  server = Served(workdir, '--config.serve.max_request_bytes=4000')
  server.workdir = workdir
  yield server
  server.close()


def _post(server, path: str, body: bytes, method: str = 'POST') -> tuple[int, dict]:
  import urllib.request
  req = urllib.request.Request(server.url + path, data=body if method == 'POST' else None,
                               method=method, headers={'Content-Type': 'application/json'})
  try:
    with urllib.request.urlopen(req, timeout=60) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def _openai_error(reply: dict) -> dict:
  """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}; returns the inner."""
  assert set(reply) == {'error'}, reply
  assert set(reply['error']) == {'message', 'type', 'param', 'code'}, reply
  assert reply['error']['message'] and reply['error']['type'], reply
  return reply['error']


CHAT_PATH, TEXT_PATH = '/v1/chat/completions', '/v1/completions'
# Valid JSON whose strings are not text: lone surrogates, in every kind of place.
SURROGATES = {
    'chat content': (CHAT_PATH, r'{"model": "model", "messages": [{"role": "user", '
                     r'"content": "坏\ud800"}]}', 'messages.0.content'),
    'chat text part': (CHAT_PATH, r'{"model": "model", "messages": [{"role": "user", "content": '
                       r'[{"type": "text", "text": "\udc80"}]}]}', 'messages.0.content.0.text'),
    'prompt': (TEXT_PATH, r'{"model": "model", "prompt": "人民\udfff"}', 'prompt'),
    'prompt list': (TEXT_PATH, r'{"model": "model", "prompt": ["\ud801x"]}', 'prompt.0'),
    'stop': (TEXT_PATH, r'{"model": "model", "prompt": "人民", "stop": ["\ud800"]}', 'stop.0'),
    'model': (CHAT_PATH, r'{"model": "m\ud800", "messages": [{"role": "user", "content": "x"}]}',
              'model'),
    'a key': (CHAT_PATH, r'{"model": "model", "\ud800": 1, "messages": []}',
              'a key of the body'),
}
OTHER_BAD = {
    'empty prompt list': (TEXT_PATH, '{"model": "model", "prompt": []}', 400, 'prompt'),
    'not json': (CHAT_PATH, '{"model": "model", "messages": [', 400, None),
    'not an object': (CHAT_PATH, '[1, 2]', 400, None),
    'not utf-8': (TEXT_PATH, b'{"model": "model", "prompt": "\xff\xfe"}', 400, None),
    'too large': (TEXT_PATH, '{"model": "model", "prompt": "' + '人' * 3000 + '"}', 413, None),
    'token id out of range': (TEXT_PATH, '{"model": "model", "prompt": [5, 99999]}', 400, 'prompt'),
    'unknown model': (TEXT_PATH, '{"model": "nope", "prompt": "人民"}', 404, 'model'),
}


@pytest.mark.parametrize('name', list(SURROGATES))
def test_server_lone_surrogate_is_a_400_naming_the_field(name, served):
  path, body, field = SURROGATES[name]
  status, reply = _post(served, path, body.encode('utf-8'))
  error = _openai_error(reply)
  assert status == 400 and error['param'] == field, (name, reply)
  assert 'lone surrogate' in error['message'] and error['type'] == 'invalid_request_error'


@pytest.mark.parametrize('name', list(OTHER_BAD))
def test_server_bad_bodies_get_openai_errors(name, served):
  path, body, want, param = OTHER_BAD[name]
  status, reply = _post(served, path, body if isinstance(body, bytes) else body.encode('utf-8'))
  error = _openai_error(reply)
  assert status == want and error['param'] == param, (name, reply)
  if name == 'empty prompt list':   # what it is, not "a batch of prompts"
    assert 'empty list' in error['message'] and 'batch' not in error['message']


@pytest.mark.parametrize('method, path, want', [('GET', TEXT_PATH, 405), ('GET', '/v1/nowhere', 404),
                                                ('POST', '/health', 405), ('DELETE', '/v1/models', 405)])
def test_server_routes_and_methods_answer_in_openai_shape(method, path, want, served):
  status, reply = _post(served, path, b'{}', method)
  assert status == want
  _openai_error(reply)


def test_server_errors_through_the_openai_client(served):
  import openai
  client = openai.OpenAI(base_url=f'{served.url}/v1', api_key='none', max_retries=0, timeout=60)
  cases = [
      (openai.BadRequestError, 400, dict(prompt=[]), 'prompt'),
      (openai.NotFoundError, 404, dict(prompt='人民', model='nope'), 'model'),
      (openai.BadRequestError, 400, dict(prompt='人民', max_tokens=100_000), 'max_tokens'),
      (openai.BadRequestError, 400, dict(prompt='人民', logprobs=21), 'logprobs'),
  ]
  for kind, status, kw, param in cases:
    with pytest.raises(kind) as e:
      client.completions.create(**dict(dict(model='model'), **kw))
    assert e.value.status_code == status and e.value.body['param'] == param, kw
    assert set(e.value.body) == {'message', 'type', 'param', 'code'}
  with pytest.raises(openai.BadRequestError) as e:
    client.chat.completions.create(model='model', messages=[])
  assert e.value.body['param'] == 'messages'
  # The client itself refuses to send a lone surrogate (its JSON is UTF-8): raw HTTP above.
  with pytest.raises(UnicodeEncodeError):
    client.completions.create(model='model', prompt='坏\ud800')
  assert client.completions.create(model='model', prompt='人民', max_tokens=3,
                                   temperature=0).choices[0].text is not None


def test_serve_on_a_port_in_use_or_an_address_not_here(served, capsys):
  for args, needles in (
      (['--port', str(served.port)], [f'--port {served.port}: cannot listen there',
                                      'the port is in use']),
      (['--host', '192.0.2.1', '--port', '8000'],     # TEST-NET-1: never this machine's
       ['--host 192.0.2.1 --port 8000: cannot listen there: Cannot assign requested address']),
      (['--port', '70000'], ['--port 70000: must be in 1..65535'])):
    code, out, err = cli('serve', '--workdir', served.workdir, *args)
    user_error((code, out, err), *needles)
    assert 'serve: http' not in out + err and 'compiled' not in err   # before the warm-up
  status, reply = _post(served, TEXT_PATH, b'{"model": "model", "prompt": "x", "max_tokens": 2}')
  assert status == 200 and reply['choices'][0]['finish_reason'] == 'length'


def test_serve_refuses_to_start_when_a_warm_up_program_fails(served, monkeypatch):
  from serving import get
  from zhgpt_jax import engine_steps

  def broken(*args, **kwargs):
    raise RuntimeError('RESOURCE_EXHAUSTED: out of memory while trying to allocate')

  monkeypatch.setattr(engine_steps, 'prefill', broken)
  from serving import free_port
  line = user_error(cli('serve', '--workdir', served.workdir, '--port', str(free_port())),
                    'serve: the warm-up prefill of 1 x 16 tokens failed', 'RESOURCE_EXHAUSTED',
                    'not serving')
  assert 'serve: http' not in line
  monkeypatch.undo()
  # The same command with a model that runs: `served` is it (started by the same code).
  status, body = get(f'{served.url}/health')
  assert status == 200 and json.loads(body)['compiled'] == dict(prefill=5, decode=3)


def _rss_kb(pid: int) -> int:
  with open(f'/proc/{pid}/status', encoding='ascii') as f:
    return int(next(l for l in f if l.startswith('VmRSS:')).split()[1])


def test_server_under_a_thousand_bad_requests(served):
  """The bad-request sequence, 1,000 times over: the server keeps answering a good request
  with `main.py sample`'s greedy reply, its RSS grows by at most 10%, and its log holds no
  traceback."""
  bad = [(p, b.encode('utf-8')) for p, b, _ in SURROGATES.values()] + [
      (p, b if isinstance(b, bytes) else b.encode('utf-8')) for p, b, _, _ in OTHER_BAD.values()]
  good = json.dumps(dict(model='model', prompt='人民', temperature=0, max_tokens=12),
                    ensure_ascii=False).encode('utf-8')
  code, want, err = cli('sample', '--workdir', served.workdir, '--prompt', '人民',
                        '--config.sample.temperature=0', '--config.sample.max_new_tokens=12')
  assert code == 0, err[-2000:]

  def reply():
    status, body = _post(served, TEXT_PATH, good)
    assert status == 200, body
    return '人民' + body['choices'][0]['text'] + '\n'

  assert reply() == want
  for i in range(200):    # allocations settle (connections, caches) before the baseline
    _post(served, *bad[i % len(bad)])
  rss0 = _rss_kb(served.proc.pid)
  for i in range(1000):
    status, body = _post(served, *bad[i % len(bad)])
    assert status >= 400 and 'error' in body
  rss1 = _rss_kb(served.proc.pid)
  assert reply() == want
  assert rss1 <= 1.10 * rss0, (rss0, rss1)
  log = served.output()
  assert 'Traceback' not in log and 'Internal Server Error' not in log, log[-3000:]
