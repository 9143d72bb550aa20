"""A small GPT that trains on 2 CPU cores in about 15 minutes on the builtin corpus.

Sized for compute, not for capacity: on a CPU the budget is a few PFLOP-seconds, so a narrow
model (d=128) that sees ~5M tokens (2.5 epochs) beats a wider one that sees fewer than one
epoch. A high rate suits so small a model; the context is short from the start.
"""

from zhgpt_jax.config import default_config


def get_config():
  c = default_config('tiny')
  c.tokenizer.vocab_size = 8000
  c.model.update(n_layer=4, n_head=4, d_model=128, seq_len=128)
  c.model.attention = 'xla'
  c.model.dtype = 'float32'
  c.train.steps = 2500
  c.train.per_device_batch = 16
  c.train.short_seq_steps = 0
  c.train.log_every = 50
  c.train.eval_every = 500
  c.train.ckpt_every = 500
  c.train.peak_flops = 0.0  # 0 = MFU against a float32 matmul measured on this device
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 100
  return c
