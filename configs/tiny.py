"""A small GPT that trains on 2 CPU cores in under 15 minutes on the builtin corpus.

Sized for compute, not capacity: 15 CPU minutes buy ~30 PFLOP, so a narrow model (d=128,
11.7 MFLOPs/token) sees ~3M tokens (1.5 epochs), where GPT-2's d=256 shape would see a
third of that. The context is short (128) from the start.

The optimiser is what makes 1500 steps enough. With AdamW at one rate the model sits at
unigram level (~7.6 nats) for its first ~300 steps: the embeddings and head, which carry the
bigram statistics, want a far higher rate than the blocks tolerate. Muon (optim.name='muon')
updates the blocks' matrices by their orthogonalised momentum at muon_lr 0.02 and leaves
embeddings, head, norms and biases to Adam at lr 3e-2. Val bits/char after 400-step runs
(one core each, same data): AdamW 3e-3 7.47; Muon + Adam 3e-3 6.89, 1e-2 6.65, 3e-2 6.58,
6e-2 6.59, 1e-1 6.63; muon_lr 0.05 6.91. At 1500 steps: tied 5.83 (Adam 6e-2: 5.87),
untied 5.77 (Adam 1e-2: 5.81); AdamW 3e-3 reached 6.78 in 1200.

The head is untied: with the token table as the head, a hidden state near the input token's
embedding scores that token highest, and greedy continuations of 64 tokens ran one token 14,
35 and 64 times over (村民们都很高兴 / 今天 / 人民); untied, 1, 1 and 8 times.
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
