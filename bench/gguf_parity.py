"""GGUF parity: llama.cpp (through llama-cpp-python) against our model, per family and type.

  python bench/gguf_parity.py --llama_python /path/to/venv/bin/python [--families ...]

For each family -- GPT-2, Llama-style (untied, GQA), Qwen2 (q/k/v biases), our MoE (softmax
gate, always-on shared experts, first layer dense: llama.cpp's `deepseek`) and Qwen2-MoE
(gated shared experts: `qwen2moe`) and DeepSeek-V3's routing (sigmoid gate, routing bias,
renormalised top-k: `glm4moe`) -- a small model with random weights (noise of 0.3
everywhere, so every tensor matters and greedy decoding does not repeat one token) and a
byte-level BPE tokenizer trained on the builtin corpus are written as GGUF in f32, f16, bf16
and q8_0 with `gguf_export.write_gguf`. llama.cpp then loads each file, with no patch:
  - tokenizes 20 Chinese / mixed strings (special-token text parsed, as ours does): equal?
  - greedy-decodes 32 tokens after 10 prompts: equal to our greedy tokens?
  - gives its logits over each prompt + our continuation: max |difference| from ours
    (real vocabulary only; MoE models computed with dense dispatch, the exact reference).
llama-cpp-python lives in its own environment (it builds llama.cpp), so this script runs
itself there (`--worker`) on the files it wrote; that mode imports only numpy and llama_cpp.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

STRINGS = [
    '村民们都很高兴，今天的天气很好。', '中国人民银行今天宣布降低利率。', '我想在apple工作1314151天～',
    'GPT-2 和 Llama 都是 Transformer 模型。', '价格：￥1,299.00（含税）', '2026年12月7日 星期一',
    '他说：“这本书很有意思，我看了三遍。”', 'Hello, 世界! How are you?', '  两个空格  和\t制表符',
    '第一行\n第二行\n\n第四行', '🚀 火箭发射成功 😁', '「引号」『书名』《红楼梦》', 'ＡＢＣ全角字母１２３',
    'e=mc^2, x_1 + y_2 = z', "I've been told he's there", '繁體中文與简体中文混排',
    'https://example.com/路径?q=搜索', '<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n',
    '………———', '人工智能（AI）正在改变世界。',
]
PROMPTS = ['村民们都很高兴', '中国人民', '今天的天气', '北京是', '我们一起去', '他说：“',
           '价格是', '人工智能', '春节的时候', 'The model']
NEW_TOKENS = 32
TYPES = ('f32', 'f16', 'bf16', 'q8_0')
ROPE = dict(position='rope', norm='rmsnorm', bias=False, mlp='swiglu')
FAMILIES = {
    'gpt2': dict(),
    'llama': dict(ROPE, n_kv_head=2, tie_embeddings=False),
    'qwen2': dict(ROPE, n_kv_head=2, qkv_bias=True),
    'moe': dict(ROPE, mlp='moe', moe=dict(n_routed=8, top_k=2, n_shared=1, first_dense=1)),
    'qwen2moe': dict(ROPE, mlp='moe', qkv_bias=True, n_kv_head=2,
                     moe=dict(n_routed=8, top_k=2, n_shared=1, shared_gate=True)),
    'moe_v3': dict(ROPE, mlp='moe', moe=dict(n_routed=8, top_k=3, n_shared=2, first_dense=1,
                                             gate='sigmoid', balance='bias')),
}


# ---------------------------------------------------------------------------------------------
# llama.cpp's side (in llama-cpp-python's environment).

def worker(job_path: str) -> None:
  import llama_cpp
  with open(job_path, encoding='utf-8') as f:
    job = json.load(f)
  out = {}
  for path in job['files']:
    # float32 KV cache (llama.cpp's default is float16) and no flash attention: the reference
    # computation, so the f32 row measures the export, not llama.cpp's speed settings
    llm = llama_cpp.Llama(model_path=path, n_ctx=job['n_ctx'], logits_all=True, n_threads=2,
                          n_batch=job['n_ctx'], type_k=0, type_v=0, flash_attn=False,
                          verbose=False)
    toks = [llm.tokenize(s.encode('utf-8'), add_bos=False, special=True) for s in job['strings']]
    greedy, logits = [], []
    for prompt, ours in zip(job['prompts'], job['continuations']):
      llm.reset()
      llm.eval(prompt)
      got = []
      for _ in range(job['new_tokens']):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        got.append(nxt)
        llm.eval([nxt])
      greedy.append(got)
      seq = prompt + ours   # teacher-forced on our tokens: logits comparable position by position
      llm.reset()
      llm.eval(seq)
      logits.append(np.array(llm.scores[:len(seq)], np.float32))
    np.save(path + '.logits.npy', np.concatenate(logits))
    out[path] = dict(tokens=toks, greedy=greedy)
    del llm
  out['version'] = llama_cpp.__version__
  with open(job_path + '.out', 'w', encoding='utf-8') as f:
    json.dump(out, f)


# ---------------------------------------------------------------------------------------------
# Our side.

def _model(overrides: dict, vocab: int, seed: int = 0):
  import jax
  from flax import traverse_util
  from zhgpt_jax import model as M
  from zhgpt_jax.config import default_config
  c = default_config('tiny')
  c.model.update(n_layer=2, n_head=4, d_model=64, seq_len=128, vocab_multiple=64)
  moe = overrides.pop('moe', {})
  c.model.update(overrides)
  c.model.moe.update(moe)
  cfg = M.model_config(c.model, vocab)
  rng = np.random.RandomState(seed)
  shapes = traverse_util.flatten_dict(
      jax.eval_shape(lambda: M.init_params(cfg, jax.random.PRNGKey(0))), sep='/')
  flat = {k: 0.3 * rng.standard_normal(s.shape).astype(np.float32) + float(k.endswith('scale'))
          for k, s in shapes.items()}
  return cfg, flat


def _ours(cfg, flat, prompts):
  """(greedy continuations, logits over prompt + continuation) of our model, full recompute."""
  import jax
  from flax import traverse_util
  from zhgpt_jax import model as M
  cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, dispatch='dense'))   # exact
  params = traverse_util.unflatten_dict(flat, sep='/')
  fwd = jax.jit(lambda p, x: M.GPT(cfg).apply({'params': p}, x)[0])
  conts, logits = [], []
  for prompt in prompts:
    buf = np.zeros((1, cfg.seq_len), np.int32)
    buf[0, :len(prompt)] = prompt
    for i in range(NEW_TOKENS):
      row = np.asarray(fwd(params, buf)[0, len(prompt) + i - 1, :cfg.real_vocab_size])
      buf[0, len(prompt) + i] = int(np.argmax(row))
    n = len(prompt) + NEW_TOKENS
    conts.append(buf[0, len(prompt):n].tolist())
    logits.append(np.asarray(fwd(params, buf)[0, :n, :cfg.real_vocab_size]))
  return conts, np.concatenate(logits)


def _tokenizer(directory: str) -> str:
  import itertools
  from zhgpt_jax import corpus, documents
  from zhgpt_jax import tokenizer as T
  from zhgpt_jax.config import default_config
  docs = list(itertools.islice(
      documents.iter_documents(default_config().data, 'all', corpus.CorpusStats()), 3000))
  T.save_tokenizer(T.train_tokenizer(docs, vocab_size=2000), directory)
  return directory


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--llama_python', default=sys.executable,
                 help='a python with llama-cpp-python installed (default: this one)')
  p.add_argument('--families', default=','.join(FAMILIES))
  p.add_argument('--types', default=','.join(TYPES))
  p.add_argument('--worker', help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    return worker(args.worker)

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from zhgpt_jax import gguf_export
  from zhgpt_jax import tokenizer as T
  tmp = tempfile.mkdtemp(prefix='gguf_parity-')
  tok_dir = _tokenizer(os.path.join(tmp, 'tok'))
  tok = T.load_tokenizer(tok_dir)
  ours_tokens = [tok.encode(s).ids for s in STRINGS]
  prompts = [tok.encode(s).ids for s in PROMPTS]
  files, ours = [], {}
  for family in args.families.split(','):
    cfg, flat = _model(dict(FAMILIES[family]), tok.get_vocab_size())
    conts, logits = _ours(cfg, flat, prompts)
    ours[family] = (conts, logits, gguf_export.architecture(cfg))
    for kind in args.types.split(','):
      path = os.path.join(tmp, f'{family}-{kind}.gguf')
      gguf_export.write_gguf(cfg, flat, path, tok_dir, kind)
      files.append(path)
  job = os.path.join(tmp, 'job.json')
  # one job per family: each has its own continuations to teacher-force
  results = {}
  for family in args.families.split(','):
    fam_files = [x for x in files if os.path.basename(x).startswith(family + '-')]
    with open(job, 'w', encoding='utf-8') as f:
      json.dump(dict(files=fam_files, strings=STRINGS, prompts=prompts, n_ctx=128,
                     new_tokens=NEW_TOKENS, continuations=ours[family][0]), f)
    subprocess.run([args.llama_python, os.path.abspath(__file__), '--worker', job], check=True)
    with open(job + '.out', encoding='utf-8') as f:
      results.update(json.load(f))
  print(f'llama-cpp-python {results["version"]}; files in {tmp}')
  print('| family | llama.cpp arch | type | tokenization equal (of 20) | greedy 32 equal '
        '(of 10 prompts) | max abs logit diff | max abs logit |')
  print('| --- | --- | --- | --- | --- | --- | --- |')
  for path in files:
    family, kind = os.path.basename(path)[:-5].rsplit('-', 1)
    conts, logits, arch = ours[family]
    r = results[path]
    theirs = np.load(path + '.logits.npy')
    same_tok = sum(a == b for a, b in zip(r['tokens'], ours_tokens))
    same_greedy = sum(a == b for a, b in zip(r['greedy'], conts))
    print(f'| {family} | {arch} | {kind} | {same_tok} | {same_greedy} | '
          f'{np.abs(theirs - logits).max():.2e} | {np.abs(logits).max():.1f} |')
  return None


if __name__ == '__main__':
  main()
