"""init_from=hf:DIR with stock transformers checkpoints and their own tokenizers, in and out.

Each checkpoint of hf_checkpoints.py (GPT-2 tied; GPT-2 with a BERT WordPiece tokenizer and
a vocab not a multiple of 128; Llama GQA untied; Qwen2 q/k/v bias tied with a padded vocab;
Qwen2-MoE; DeepSeek-V3 without and with a query latent, pretraining only) goes through what
a user does: configs/tiny.py with init_from=hf:DIR and no model
overrides trains 20 steps on the corpus cut by DIR's tokenizer, samples and exports; then
configs/sft.py fine-tunes it 20 steps (adding the ChatML tokens where missing) and exports a
chat model. Stock transformers loads both exports and must agree with us.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import hf_checkpoints as H
from configs import sft as sft_config
from configs import tiny
from zhgpt_jax import builtin_corpus, checkpoint, export, pretrained, sample, sft, train
from zhgpt_jax import model as M
from zhgpt_jax import tokenizer as T
from zhgpt_jax.config import UserError

pytestmark = pytest.mark.slow  # end-to-end: runs, servers, kill trials (minutes); CI runs them

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT_KINDS = ('gpt2', 'gpt2_bert', 'llama', 'qwen2', 'qwen2_moe')
# DeepSeek-V3's architecture (MLA without and with a query latent, 3 layers, the first dense,
# 8 routed + 1 shared experts, the sigmoid router with its correction bias): pretraining only.
DEEPSEEK = ('deepseek_v3', 'deepseek_v3_q')
KINDS = SFT_KINDS + DEEPSEEK
ARCH = dict(gpt2='GPT2LMHeadModel', gpt2_bert='GPT2LMHeadModel', llama='LlamaForCausalLM',
            qwen2='Qwen2ForCausalLM', qwen2_moe='Qwen2MoeForCausalLM',
            deepseek_v3='DeepseekV3ForCausalLM', deepseek_v3_q='DeepseekV3ForCausalLM')
TEXT = '村民们都很高兴，今天的天气很好。我们一起去北京看看长城吧！中国人民在春节的时候回家团聚。'
REVIEW = '判断这条商品评论的情感（正面/负面）：物流很快，质量也不错，推荐购买。'
# Not model fields: a small corpus, few steps and small batches, so five runs fit the CI.
QUICK = {'train.steps': 20, 'optim.warmup_steps': 2, 'train.per_device_batch': 8,
         'train.eval_every': 20, 'train.ckpt_every': 20, 'train.eval_max_batches': 1,
         'train.eval_batch': 4, 'train.sample_tokens': 0, 'train.log_every': 10,
         'train.peak_flops': 1e11, 'data.tokenize_workers': 1}
SFT = {'optim.lr': 3e-2, 'sft.eval_examples': 0}


def _override(config, values: dict):
  for key, value in values.items():
    *head, last = key.split('.')
    node = config
    for part in head:
      node = node[part]
    node[last] = value
  return config


def _chat_data(path: str, n: int = 400) -> str:
  train_reviews, _ = builtin_corpus.split_reviews()
  with open(path, 'w', encoding='utf-8') as f:
    for text, label in train_reviews[:n]:
      f.write(json.dumps({'messages': sft.review_conversation(text[:12], label)},
                         ensure_ascii=False) + '\n')
  return path


def _greedy_cfg(n: int = 30):
  return ml_collections.ConfigDict(dict(max_new_tokens=n, temperature=0.0, top_k=0, top_p=1.0,
                                        repetition_penalty=1.0, seed=0))


def _hf_model(path):
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
  return model.eval()


def _hf_greedy(model, ids: list[int], n: int = 30) -> list[int]:
  """HF greedy generation with the export's stop ids; the stop token itself removed."""
  x = torch.tensor([ids])
  out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                       repetition_penalty=1.0, top_k=None, top_p=None,
                       temperature=None)[0, len(ids):].tolist()
  stop = model.generation_config.eos_token_id
  stop = set(stop if isinstance(stop, list) else [stop])
  return out[:-1] if out and out[-1] in stop else out


def _our_logits(cfg, params, ids):
  params = jax.tree.map(jnp.asarray, params)
  return np.asarray(M.GPT(cfg).apply({'params': params}, jnp.asarray([ids]))[0][0])


def _pipeline(kind: str, root, corpus_dir: str, chat_path: str) -> dict:
  hf_dir = H.build(kind, str(root / 'hf'), H.corpus_texts(corpus_dir))
  values = dict(QUICK, **{'data.corpus': corpus_dir, 'init_from': f'hf:{hf_dir}'})
  if kind in DEEPSEEK:   # a compute field: expert blocks that never drop a token, as in HF
    values['model.moe.capacity_factor'] = 0.0
  config = _override(tiny.get_config(), values)
  out = dict(hf_dir=hf_dir, workdir=str(root / 'run'), sft_workdir=str(root / 'sft'))

  # Step 0: what the run starts from, through the run's own build and init.
  run = train.build(pretrained.resolve(config), out['workdir'], with_data=False)
  params = train.initial_params(run, jax.random.PRNGKey(0))
  ids = run.tokenizer.encode(TEXT).ids[:run.cfg.seq_len]
  out['step0'] = (_our_logits(run.cfg, params, ids), H.hf_logits(hf_dir, np.array([ids]))[0])

  if kind in ('gpt2', 'deepseek_v3_q'):   # through the command line exactly as a user types it
    args = [f'--config.{k}={v}' for k, v in values.items()]
    done = subprocess.run([sys.executable, 'main.py', '--config', 'configs/tiny.py',
                           '--workdir', out['workdir'], *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, PYTHONPATH=ROOT))
    assert done.returncode == 0, done.stderr[-2000:]
  else:
    train.train_and_evaluate(config, out['workdir'])
  out['export'] = export.export_workdir(out['workdir'], str(root / 'export'))
  if kind in DEEPSEEK:
    return out

  chat = _override(sft_config.get_config(), dict(values, **SFT, **{'sft.data': chat_path}))
  out['sft_eval'] = train.train_and_evaluate(chat, out['sft_workdir'], sft.make_task)
  out['sft_export'] = export.export_workdir(out['sft_workdir'], str(root / 'sft_export'))
  return out


@pytest.fixture(scope='module')
def runs(tmp_path_factory, tiny_data):
  """kind -> the results of `_pipeline`, built on first use and shared by the tests."""
  chat_path = _chat_data(str(tmp_path_factory.mktemp('chat') / 'chat.jsonl'))
  cache = {}

  def get(kind):
    if kind not in cache:
      cache[kind] = _pipeline(kind, tmp_path_factory.mktemp(kind), tiny_data.corpus_dir,
                              chat_path)
    return cache[kind]
  return get


@pytest.mark.parametrize('kind', KINDS)
def test_trains_on_the_checkpoints_own_tokenizer(runs, kind):
  r = runs(kind)
  with open(os.path.join(r['workdir'], 'data', 'train', 'meta.json'), encoding='utf-8') as f:
    meta = json.load(f)
  assert meta['tokenizer_hash'] == T.tokenizer_hash(r['hf_dir'])
  tok = T.load_tokenizer(r['hf_dir'])
  assert meta['vocab_size'] == tok.get_vocab_size()
  assert meta['eot_id'] == T.special_ids(tok).eos
  # The shape came from DIR, not from configs/tiny.py (4 layers, d 128, untied).
  with open(os.path.join(r['hf_dir'], 'config.json'), encoding='utf-8') as f:
    hf = json.load(f)
  saved = checkpoint.load_config(r['workdir'])
  assert saved.model.d_model == hf.get('n_embd', hf.get('hidden_size')) == 64
  assert saved.model.n_layer == hf.get('n_layer', hf.get('num_hidden_layers')) != 4
  assert saved.model.vocab_size == hf['vocab_size']
  if kind in DEEPSEEK:
    assert saved.model.attention_kind == 'mla' and saved.model.moe.gate == 'sigmoid'
    assert saved.model.mla.q_lora_rank == (hf['q_lora_rank'] or 0)
    assert saved.model.moe.routed_scale == 2.5 and saved.model.moe.balance == 'bias'
  # The workdir's copy of the tokenizer is tokenizer files only.
  assert set(os.listdir(os.path.join(r['workdir'], 'tokenizer'))) <= set(T.TOKENIZER_FILES)
  assert T.tokenizer_hash(os.path.join(r['workdir'], 'tokenizer')) == meta['tokenizer_hash']


@pytest.mark.parametrize('kind', KINDS)
def test_step0_logits_equal_hf(runs, kind):
  ours, theirs = runs(kind)['step0']
  assert np.abs(theirs).max() > 1.0           # weights big enough for a mapping error to show
  np.testing.assert_allclose(ours[:, :theirs.shape[-1]], theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize('kind', KINDS)
def test_export_loads_in_transformers_with_equal_logits_and_greedy(runs, kind):
  r = runs(kind)
  cfg, params, tok, _, _ = checkpoint.load_model(r['workdir'])
  model = _hf_model(r['export'])
  assert type(model).__name__ == ARCH[kind]
  ids = tok.encode(TEXT).ids[:cfg.seq_len]
  with torch.no_grad():
    theirs = model(torch.tensor([ids])).logits.numpy()[0]
  np.testing.assert_allclose(_our_logits(cfg, params, ids), theirs, atol=1e-4, rtol=0)
  hf_tok = transformers.AutoTokenizer.from_pretrained(r['export'])
  prompt = TEXT[:8]
  assert hf_tok(prompt, add_special_tokens=False)['input_ids'] == tok.encode(prompt).ids
  ours = sample.generate_ids(cfg, jax.tree.map(jnp.asarray, params), tok, [prompt],
                             _greedy_cfg())[0]
  assert len(ours) > 0
  assert _hf_greedy(model, tok.encode(prompt).ids) == ours
  with open(os.path.join(r['export'], 'generation_config.json'), encoding='utf-8') as f:
    gen = json.load(f)
  assert (gen['temperature'], gen['top_k'], gen['top_p'], gen['repetition_penalty']) == \
      (0.8, 50, 0.95, 1.1)
  assert gen['transformers_version']
  template = os.path.join(r['hf_dir'], 'chat_template.jinja')
  if os.path.exists(template):    # the checkpoint's own chat template survives the round trip
    with open(template, encoding='utf-8') as a, \
        open(os.path.join(r['export'], 'chat_template.jinja'), encoding='utf-8') as b:
      assert a.read() == b.read()
  with open(os.path.join(r['export'], 'README.md'), encoding='utf-8') as f:
    card = f.read()
  assert ARCH[kind] in card and 'bpc' in card and '20 steps' in card


@pytest.mark.parametrize('kind', DEEPSEEK)
def test_deepseek_export_imports_exactly(runs, kind):
  """The trained DeepSeek-V3 model, exported and imported: the same model, bit for bit
  (the routing bias and the rotary columns' interleaved layout included)."""
  r = runs(kind)
  cfg, params, _, _, _ = checkpoint.load_model(r['workdir'])
  cfg2, params2 = export.import_hf(r['export'])
  assert cfg2 == cfg
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert jax.tree.structure(params) == jax.tree.structure(params2)


@pytest.mark.parametrize('kind', SFT_KINDS)
def test_sft_adds_chatml_and_the_chat_export_stops_at_im_end(runs, kind):
  r = runs(kind)
  src = T.load_tokenizer(r['hf_dir'])
  tok = T.load_tokenizer(os.path.join(r['sft_workdir'], 'tokenizer'))
  s = T.special_ids(tok)
  assert s.im_start is not None and s.im_end is not None
  assert r['sft_eval']['loss'] < 1.0
  cfg, params, _, _, _ = checkpoint.load_model(r['sft_workdir'])
  if T.has_chatml(src):
    assert tok.get_vocab_size() == src.get_vocab_size()
  else:   # added as new ids; embedding rows grown unless the vocab had padding to spare
    assert (s.im_start, s.im_end) == (src.get_vocab_size(), src.get_vocab_size() + 1)
    with open(os.path.join(r['hf_dir'], 'config.json'), encoding='utf-8') as f:
      rows = json.load(f)['vocab_size']
    assert cfg.vocab_size == max(rows, src.get_vocab_size() + 2)

  model = _hf_model(r['sft_export'])
  hf_tok = transformers.AutoTokenizer.from_pretrained(r['sft_export'])
  with open(os.path.join(r['sft_export'], 'tokenizer_config.json'), encoding='utf-8') as a, \
      open(os.path.join(r['sft_export'], 'chat_template.jinja'), encoding='utf-8') as b:
    assert json.load(a)['chat_template'] == b.read()      # transformers 4 and 5 read the same
  stop = model.generation_config.eos_token_id
  assert stop == [s.eos, s.im_end] or (s.eos == s.im_end and stop == s.eos)
  text = hf_tok.apply_chat_template([{'role': 'user', 'content': REVIEW}], tokenize=False,
                                    add_generation_prompt=True)
  ids = hf_tok(text, add_special_tokens=False)['input_ids']
  assert ids[-3:] == tok.encode('<|im_start|>assistant\n').ids[-3:] or ids[-1] != s.im_end
  x, n = torch.tensor([ids]), min(30, cfg.seq_len - len(ids))
  full = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                        max_new_tokens=n, top_k=None, top_p=None, temperature=None,
                        repetition_penalty=1.0)[0, len(ids):].tolist()
  assert s.im_end in full and full[-1] == s.im_end      # it answers, then stops at <|im_end|>
  assert hf_tok.decode(full[:-1]).replace(' ', '') in ('正面', '负面')
  ours = sample.generate(cfg, jax.tree.map(jnp.asarray, params), [ids], max_new_tokens=n,
                         stop_ids=list(s.stop))[0]
  assert ours == full[:-1]


def test_contradicting_override_is_one_line_exit_2(runs):
  hf_dir = runs('gpt2')['hf_dir']
  done = subprocess.run(
      [sys.executable, 'main.py', '--config', 'configs/tiny.py', f'--config.init_from=hf:{hf_dir}',
       '--config.train.steps=20', '--config.model.n_layer=3'],
      cwd=ROOT, capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
  assert done.returncode == 2 and done.stdout == ''
  assert done.stderr.count('\n') == 1 and done.stderr.startswith('main.py: error: ')
  assert 'n_layer=3' in done.stderr and 'n_layer=2' in done.stderr


def test_resolve_rules(runs):
  gpt2, bert = runs('gpt2')['hf_dir'], runs('gpt2_bert')['hf_dir']
  c = tiny.get_config()
  c.init_from = f'hf:{bert}'
  r = pretrained.resolve(c)
  assert r.model.seq_len == 64 and c.model.seq_len == 128     # DIR's context is 64; c unchanged
  assert pretrained.resolve(r, {'model.seq_len', 'model.n_layer'}).to_dict() == r.to_dict()
  r.model.seq_len = 32                                          # shorter than DIR's: kept
  assert pretrained.resolve(r).model.seq_len == 32
  c.model.seq_len = 128
  with pytest.raises(UserError, match='seq_len=128 is longer than'):
    pretrained.resolve(c, {'model.seq_len'})
  c.model.seq_len = 64
  c.model.mlp_ratio = 2.5                                       # 2.5 * 64 = DIR's n_inner 160
  assert pretrained.resolve(c, {'model.mlp_ratio'}).model.mlp_hidden == 160
  c.model.mlp_ratio = 4.0
  with pytest.raises(UserError, match='mlp_ratio=4.0 gives mlp_hidden=256, which contradicts'):
    pretrained.resolve(c, {'model.mlp_ratio'})
  c.tokenizer.path = gpt2
  with pytest.raises(UserError, match='conflicts with init_from'):
    pretrained.resolve(c)
  c.tokenizer.path = bert                                       # the same tokenizer: fine
  assert pretrained.resolve(c).tokenizer.path == bert
