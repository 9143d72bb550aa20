"""Decoding benchmark: our cached greedy decoding vs transformers `generate` on the same model;
or (`--attention`) our decoding with MHA vs GQA vs MLA attention side by side.

  python bench/decode.py [--batches 1,16] [--new_tokens 128] [--repeats 3] [--torch_threads 0]
  python bench/decode.py --attention [--d_model 128 --n_head 4 --n_layer 4 --seq_len 256]

A random-init model (speed does not depend on the weights; default: the 'tiny' preset,
4 layers, d_model 256, 4 heads, seq_len 256, vocab 8000) is exported with `export.export_hf`
and loaded as a PyTorch GPT2LMHeadModel on the CPU. Each side decodes `--new_tokens` greedy
tokens after a `--prompt_len` prompt per row, never stopping early; one warm-up run per batch
size (compilation, allocator) is not timed, then the best of `--repeats` interleaved runs is.
Tokens/s counts new tokens over all rows; ratio = ours / HF. Like our sampler, HF's generate
never picks vocab-padding ids (export writes them to generation_config's suppress_tokens), so
the greedy tokens must be identical; the last column checks it.

`--attention`: three Llama-style models that differ only in attention, at the same d_model,
heads and layers: MHA (n_kv_head = n_head), GQA (n_kv_head = n_head / 4, at least 1) and
DeepSeek's MLA (configs/moe.py:deepseek's latent widths unless overridden). For each: the KV
cache's bytes per token (float32, all layers) and the cache of one full-context row, and
greedy decode tokens/s per batch size, the three interleaved, best of `--repeats`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import torch  # pylint: disable=wrong-import-position
import transformers  # pylint: disable=wrong-import-position

import timing  # pylint: disable=import-error,wrong-import-position  (bench/ is on sys.path)
from zhgpt_jax import export  # pylint: disable=wrong-import-position
from zhgpt_jax import model as model_lib  # pylint: disable=wrong-import-position
from zhgpt_jax import sample  # pylint: disable=wrong-import-position
from zhgpt_jax.config import default_config  # pylint: disable=wrong-import-position


def _attention_models(args):
  """{name: (cfg, params)}: MHA, GQA and MLA models, equal but for their attention."""
  from configs import moe
  mla = moe.get_config('deepseek').model.mla
  out = {}
  for name, kind, kv in (('MHA', 'mha', args.n_head), ('GQA', 'mha', max(1, args.n_head // 4)),
                         ('MLA', 'mla', 0)):
    c = default_config('tiny')
    c.model.update(n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model,
                   n_kv_head=kv, seq_len=args.seq_len, position='rope', mlp='swiglu',
                   norm='rmsnorm', bias=False, tie_embeddings=False, attention_kind=kind)
    c.model.mla.update({k: v for k, v in mla.items()})
    for k in ('q_lora_rank', 'kv_lora_rank', 'qk_nope_head_dim', 'qk_rope_head_dim',
              'v_head_dim'):
      if getattr(args, k) >= 0:
        c.model.mla[k] = getattr(args, k)
    cfg = model_lib.model_config(c.model, args.vocab)
    out[name] = (cfg, model_lib.init_params(cfg, jax.random.PRNGKey(0)))
  return out


def compare_attention(args) -> None:
  """MHA vs GQA vs MLA: KV-cache bytes per token and decode tokens/s, side by side."""
  from zhgpt_jax import attention
  models = _attention_models(args)
  n = args.new_tokens
  mla = models['MLA'][0].mla
  print(f'attention: n_layer={args.n_layer}, d_model={args.d_model}, n_head={args.n_head}, '
        f'seq_len={args.seq_len}, vocab={args.vocab}, SwiGLU/RMSNorm/RoPE, float32; MLA '
        f'q_lora_rank={mla.q_lora_rank}, kv_lora_rank={mla.kv_lora_rank}, '
        f'qk_nope_head_dim={mla.qk_nope_head_dim}, qk_rope_head_dim={mla.qk_rope_head_dim}, '
        f'v_head_dim={mla.v_head_dim}; prompt {args.prompt_len}, {n} new tokens, greedy; '
        f'jax {jax.__version__} on {jax.devices()[0].platform}; load average '
        f'{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores')
  batches = [int(x) for x in args.batches.split(',')]
  speed = {}
  for b in batches:
    prompts = np.random.RandomState(b).randint(0, 1000, (b, args.prompt_len)).tolist()
    fns = [lambda cfg=cfg, params=params: sample.generate(cfg, params, prompts,
                                                          max_new_tokens=n)
           for cfg, params in models.values()]
    for name, t in zip(models, map(min, timing.interleaved(fns, args.repeats))):
      speed[name, b] = b * n / t
  print(f'load average at the end: {os.getloadavg()[0]:.1f}')
  heads = ' | '.join(f'batch {b} tok/s' for b in batches)
  print(f'\n| attention | params | KV cache bytes / token | vs MHA | cache of one '
        f'{args.seq_len}-token row | {heads} |')
  print('|---|---:|---:|---:|---:|' + '---:|' * len(batches))
  mha = attention.cache_bytes_per_token(models['MHA'][0])
  for name, (cfg, params) in models.items():
    per = attention.cache_bytes_per_token(cfg)
    tps = ' | '.join(f'{speed[name, b]:,.0f}' for b in batches)
    print(f'| {name} | {model_lib.count_params(params) / 1e6:.2f}M | {per:,} | {per / mha:.3f} '
          f'| {per * args.seq_len / 2**10:,.0f} KiB | {tps} |')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--preset', default='tiny')
  parser.add_argument('--seq_len', type=int, default=256)
  parser.add_argument('--vocab', type=int, default=8000)
  parser.add_argument('--batches', default='1,16')
  parser.add_argument('--prompt_len', type=int, default=16)
  parser.add_argument('--new_tokens', type=int, default=128)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--torch_threads', type=int, default=0, help='0 = torch\'s default')
  parser.add_argument('--attention', action='store_true', help='MHA vs GQA vs MLA, ours only')
  parser.add_argument('--n_layer', type=int, default=4)
  parser.add_argument('--n_head', type=int, default=4)
  parser.add_argument('--d_model', type=int, default=128)
  for k in ('q_lora_rank', 'kv_lora_rank', 'qk_nope_head_dim', 'qk_rope_head_dim', 'v_head_dim'):
    parser.add_argument(f'--{k}', type=int, default=-1, help='MLA; -1: the deepseek preset\'s')
  args = parser.parse_args()
  if args.attention:
    compare_attention(args)
    return
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)

  c = default_config(args.preset)
  c.model.seq_len = args.seq_len
  cfg = model_lib.model_config(c.model, args.vocab)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  with tempfile.TemporaryDirectory() as tmp:
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        export.export_hf(cfg, params, os.path.join(tmp, 'hf'))).float().eval()
  n = args.new_tokens
  print(f'model: {args.preset} (n_layer={cfg.n_layer}, d_model={cfg.d_model}, '
        f'n_head={cfg.n_head}, seq_len={cfg.seq_len}, vocab={cfg.vocab_size}), '
        f'{model_lib.count_params(params) / 1e6:.1f}M params, float32; prompt {args.prompt_len}, '
        f'{n} new tokens, greedy; jax {jax.__version__} on {jax.devices()[0].platform}, '
        f'torch {torch.__version__} ({torch.get_num_threads()} threads), '
        f'transformers {transformers.__version__}; load average {os.getloadavg()[0]:.1f} '
        f'on {os.cpu_count()} cores')

  rows = []
  for b in [int(x) for x in args.batches.split(',')]:
    prompts = np.random.RandomState(b).randint(0, cfg.real_vocab_size, (b, args.prompt_len))
    out = {}

    def ours():
      out['ours'] = sample.generate(cfg, params, prompts.tolist(), max_new_tokens=n)

    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    def theirs():
      with torch.inference_mode():
        out['hf'] = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                eos_token_id=None, use_cache=True)

    t_ours, t_hf = map(min, timing.interleaved([ours, theirs], args.repeats))
    new_hf = out['hf'][:, args.prompt_len:].tolist()
    same = np.mean([a[-n:] == h for a, h in zip(out['ours'], new_hf)])
    rows.append((b, b * n / t_ours, b * n / t_hf, same))

  print(f'load average at the end: {os.getloadavg()[0]:.1f}')
  print('\n| batch | ours tok/s | HF tok/s | ours / HF | rows with identical greedy tokens |')
  print('|---:|---:|---:|---:|---:|')
  for b, ours_tps, hf_tps, same in rows:
    print(f'| {b} | {ours_tps:,.0f} | {hf_tps:,.0f} | {ours_tps / hf_tps:.2f}x | {same:.0%} |')


if __name__ == '__main__':
  main()
