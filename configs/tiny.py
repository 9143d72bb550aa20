"""The CPU recipe: a small Llama-style GPT that trains on 2 CPU cores in about 10 minutes on the
builtin corpus.

4 layers, d_model 128, an 8k vocab, context 128, untied head; RoPE, SwiGLU, RMSNorm and no
biases (the Llama switches of configs/modern.py); Muon on the blocks' matrices (at 0.01) and
Adam on the rest (at 3e-2), 1360 steps (no longer than GPT-2's 1500 here). It is the config the
README, the notebook and configs/sft.py start from.
`--config configs/tiny.py:gpt2` is the recipe before it, on GPT-2's blocks (learned positions,
GELU, LayerNorm, biases; Muon at 0.02; 1500 steps), the reference bench/recipes.py counts its
budget in.
How these choices were made (sizes, optimiser, rates, the untied head, the Llama switches) is
in BENCHMARKS.md, "Recipes".
"""

from zhgpt_jax.config import default_config

ARCHS = ('llama', 'gpt2')


def get_config(arch='llama'):
  if arch not in ARCHS:
    raise ValueError(f'configs/tiny.py:{arch}: the choices are {", ".join(ARCHS)}')
  c = default_config('tiny')
  c.tokenizer.vocab_size = 8000
  c.model.update(n_layer=4, n_head=4, d_model=128, seq_len=128)
  c.model.tie_embeddings = False   # a tied head favours repeating the input token
  c.optim.muon_lr = 0.02        # the blocks' matrices (Muon)
  c.train.steps = 1500
  if arch == 'llama':   # 5.616 against GPT-2's 5.774 val bits/char, 3 seeds (BENCHMARKS.md)
    c.model.update(position='rope', rope_theta=10000.0, mlp='swiglu', norm='rmsnorm',
                   norm_eps=1e-6, bias=False)
    c.optim.muon_lr = 0.01      # 5.605 against 0.02's 5.626 at 1400 steps, 3 seeds each
    c.train.steps = 1360        # no longer than GPT-2's 1500, side by side (BENCHMARKS.md)
  c.model.attention = 'xla'
  c.model.dtype = 'float32'
  c.train.per_device_batch = 16
  c.train.short_seq_steps = 0
  c.train.loss_chunk = 256      # the 8k-vocab head + cross-entropy in chunks: ~8% faster here
  c.train.log_every = 50
  c.train.eval_every = 400
  c.train.ckpt_every = 400
  c.train.peak_flops = 0.0  # 0 = MFU against a float32 matmul measured on this device
  c.optim.name = 'muon'
  c.optim.lr = 3e-2             # embeddings, head, norms, biases (Adam)
  c.optim.warmup_steps = 100
  c.sample.max_new_tokens = 64  # leaves room for a prompt in the 128-token context
  return c
