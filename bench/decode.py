"""Decoding benchmark: our cached greedy decoding vs transformers `generate` on the same model.

  python bench/decode.py [--batches 1,16] [--new_tokens 128] [--repeats 3] [--torch_threads 0]

A random-init model (speed does not depend on the weights; default: the 'tiny' preset,
4 layers, d_model 256, 4 heads, seq_len 256, vocab 8000) is exported with `export.export_hf`
and loaded as a PyTorch GPT2LMHeadModel on the CPU. Each side decodes `--new_tokens` greedy
tokens after a `--prompt_len` prompt per row, never stopping early; one warm-up run per batch
size (compilation, allocator) is not timed, then the best of `--repeats` interleaved runs is.
Tokens/s counts new tokens over all rows; ratio = ours / HF. Like our sampler, HF's generate
never picks vocab-padding ids (export writes them to generation_config's suppress_tokens), so
the greedy tokens must be identical; the last column checks it.
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
  args = parser.parse_args()
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
