"""A small GPT that trains on 2 CPU cores in about 10 minutes on the builtin corpus."""

from zhgpt_jax.config import default_config


def get_config():
  c = default_config('tiny')
  c.tokenizer.vocab_size = 8000
  c.model.seq_len = 128
  c.model.attention = 'xla'
  c.model.dtype = 'float32'
  c.train.steps = 3000
  c.train.per_device_batch = 32
  c.train.short_seq_steps = 0
  c.train.log_every = 50
  c.train.eval_every = 500
  c.train.ckpt_every = 500
  c.train.peak_flops = 0.0  # 0 = MFU is measured against a matmul benchmark of this device
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 100
  return c
