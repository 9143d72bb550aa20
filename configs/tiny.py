"""The CPU recipe: a small GPT that trains on 2 CPU cores in about 15 minutes on the builtin corpus.

4 layers, d_model 128, an 8k vocab, context 128, untied head; Muon on the blocks' matrices
and Adam on the rest, 1500 steps. It is the config the README, the notebook and
configs/sft.py start from. How these choices were made (sizes, optimiser, rates, the
untied head) is in BENCHMARKS.md, "Recipes".
"""

from zhgpt_jax.config import default_config


def get_config():
  c = default_config('tiny')
  c.tokenizer.vocab_size = 8000
  c.model.update(n_layer=4, n_head=4, d_model=128, seq_len=128)
  c.model.tie_embeddings = False   # a tied head favours repeating the input token
  c.model.attention = 'xla'
  c.model.dtype = 'float32'
  c.train.steps = 1500
  c.train.per_device_batch = 16
  c.train.short_seq_steps = 0
  c.train.loss_chunk = 256      # the 8k-vocab head + cross-entropy in chunks: ~8% faster here
  c.train.log_every = 50
  c.train.eval_every = 400
  c.train.ckpt_every = 400
  c.train.peak_flops = 0.0  # 0 = MFU against a float32 matmul measured on this device
  c.optim.name = 'muon'
  c.optim.muon_lr = 0.02        # the blocks' matrices (Muon)
  c.optim.lr = 3e-2             # embeddings, head, norms, biases (Adam)
  c.optim.warmup_steps = 100
  c.sample.max_new_tokens = 64  # leaves room for a prompt in the 128-token context
  return c
