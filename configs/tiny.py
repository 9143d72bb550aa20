"""A small GPT that trains on 2 CPU cores in about 15 minutes on the builtin corpus.

Sized for compute, not capacity: 15 CPU minutes buy ~30 PFLOP, so a narrow model (d=128,
11.7 MFLOPs/token) sees 2.5M tokens (1.2 epochs), where GPT-2's d=256 shape would see a
third of that. A high peak rate suits so small a model; the context is short from the start.
"""

from zhgpt_jax.config import default_config


def get_config():
  c = default_config('tiny')
  c.tokenizer.vocab_size = 8000
  c.model.update(n_layer=4, n_head=4, d_model=128, seq_len=128)
  c.model.attention = 'xla'
  c.model.dtype = 'float32'
  c.train.steps = 1200
  c.train.per_device_batch = 16
  c.train.short_seq_steps = 0
  c.train.loss_chunk = 256      # the 8k-vocab head + cross-entropy in chunks: ~8% faster here
  c.train.log_every = 50
  c.train.eval_every = 400
  c.train.ckpt_every = 400
  c.train.peak_flops = 0.0  # 0 = MFU against a float32 matmul measured on this device
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 60
  c.sample.max_new_tokens = 64  # leaves room for a prompt in the 128-token context
  return c
