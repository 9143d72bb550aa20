"""A nanoGPT-style PyTorch GPT-2: the eager reference that `bench/train_step.py` times ours against.

Pre-LayerNorm blocks, causal self-attention through `F.scaled_dot_product_attention`,
tanh-GELU MLP, learned positions, a head tied to the token embedding or not; float32. It has
exactly the parameters of our `model.GPT` with the default switches (q, k, v fused into one
`c_attn` matrix holds the same numbers), so parameter counts and, with copied weights, losses
match. Names carry shapes as in `zhgpt_jax/model.py`: B batch, L length, D width, N heads,
H head width, V vocab.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class Attention(nn.Module):

  def __init__(self, d_model: int, n_head: int):
    super().__init__()
    self.n_head = n_head
    self.c_attn = nn.Linear(d_model, 3 * d_model)
    self.c_proj = nn.Linear(d_model, d_model)

  def forward(self, x_BxLxD):
    b, l, d = x_BxLxD.shape
    q, k, v = self.c_attn(x_BxLxD).split(d, dim=2)
    q_BxNxLxH, k_BxNxLxH, v_BxNxLxH = (
        t.view(b, l, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v))
    y_BxNxLxH = F.scaled_dot_product_attention(q_BxNxLxH, k_BxNxLxH, v_BxNxLxH, is_causal=True)
    return self.c_proj(y_BxNxLxH.transpose(1, 2).reshape(b, l, d))


class MLP(nn.Module):

  def __init__(self, d_model: int, hidden: int):
    super().__init__()
    self.c_fc = nn.Linear(d_model, hidden)
    self.c_proj = nn.Linear(hidden, d_model)

  def forward(self, x_BxLxD):
    return self.c_proj(F.gelu(self.c_fc(x_BxLxD), approximate='tanh'))


class Block(nn.Module):

  def __init__(self, d_model: int, n_head: int, hidden: int, eps: float):
    super().__init__()
    self.ln_1 = nn.LayerNorm(d_model, eps=eps)
    self.attn = Attention(d_model, n_head)
    self.ln_2 = nn.LayerNorm(d_model, eps=eps)
    self.mlp = MLP(d_model, hidden)

  def forward(self, x_BxLxD):
    x_BxLxD = x_BxLxD + self.attn(self.ln_1(x_BxLxD))
    return x_BxLxD + self.mlp(self.ln_2(x_BxLxD))


class GPT(nn.Module):
  """`forward(tokens_BxL, targets_BxL)` returns float32 logits [B, L, V] and the mean loss."""

  def __init__(self, vocab_size: int, seq_len: int, n_layer: int, n_head: int, d_model: int,
               hidden: int, eps: float = 1e-5, tie_embeddings: bool = True):
    super().__init__()
    self.wte = nn.Embedding(vocab_size, d_model)
    self.lm_head = None if tie_embeddings else nn.Linear(d_model, vocab_size, bias=False)
    self.wpe = nn.Embedding(seq_len, d_model)
    self.h = nn.ModuleList(Block(d_model, n_head, hidden, eps) for _ in range(n_layer))
    self.ln_f = nn.LayerNorm(d_model, eps=eps)
    for name, p in self.named_parameters():
      if name.endswith('c_proj.weight'):
        # GPT-2: scale residual projections by 1/sqrt(2·n_layer), as our model does.
        nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layer))
      elif name == 'wpe.weight':
        nn.init.normal_(p, std=0.01)
      elif p.dim() >= 2:
        nn.init.normal_(p, std=0.02)
      elif name.endswith('bias'):
        nn.init.zeros_(p)

  def forward(self, tokens_BxL, targets_BxL=None):
    l = tokens_BxL.shape[1]
    x_BxLxD = self.wte(tokens_BxL) + self.wpe(torch.arange(l, device=tokens_BxL.device))
    for block in self.h:
      x_BxLxD = block(x_BxLxD)
    head_VxD = self.wte.weight if self.lm_head is None else self.lm_head.weight
    logits_BxLxV = F.linear(self.ln_f(x_BxLxD), head_VxD)
    loss = None
    if targets_BxL is not None:
      loss = F.cross_entropy(logits_BxLxV.view(-1, logits_BxLxV.shape[-1]), targets_BxL.view(-1))
    return logits_BxLxV, loss


def make_optimizers(model: GPT, o) -> list[torch.optim.Optimizer]:
  """optim.py's optimizer for the `optim` config `o`; each param group is tagged with its `kind`.

  AdamW decays matrices only, not biases, norms or (unless asked) embeddings. With
  `o.name == 'muon'`, torch's Muon (the same Newton-Schulz quintic, Nesterov momentum and
  sqrt(max(1, out/in)) scaling as optax's) takes the blocks' 2-D matrices at `muon_lr` and
  AdamW the rest without decay, as optax.contrib.muon does (its Adam part adds a Nesterov
  look-ahead, an elementwise op torch's AdamW lacks). The fused c_attn is one [3D, D] matrix
  here where ours orthogonalises q, k and v separately: the same FLOPs, not the same update.
  """
  decay, no_decay, muon = [], [], []
  for name, p in model.named_parameters():
    top = name.split('.')[0]
    if o.name == 'muon':
      (muon if top == 'h' and p.dim() == 2 else no_decay).append(p)
    else:
      (decay if p.dim() >= 2 and (o.decay_embeddings or top not in ('wte', 'wpe'))
       else no_decay).append(p)
  adam_groups = [dict(params=ps, weight_decay=wd, kind='adam')
                 for ps, wd in ((decay, o.weight_decay), (no_decay, 0.0)) if ps]
  optimizers = [torch.optim.AdamW(adam_groups, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)]
  if muon:
    optimizers.append(torch.optim.Muon([dict(params=muon, kind='muon')], lr=o.muon_lr,
                                       weight_decay=o.weight_decay, momentum=o.muon_beta))
  return optimizers


def train_step(model: GPT, optimizers, tokens_BxL, targets_BxL, lrs: dict[str, float],
               grad_clip: float) -> torch.Tensor:
  """One step of `optimizers` at `lrs[group kind]` with global-norm clipping; returns the loss."""
  for opt in optimizers:
    for group in opt.param_groups:
      group['lr'] = lrs[group['kind']]
  _, loss = model(tokens_BxL, targets_BxL)
  for opt in optimizers:
    opt.zero_grad(set_to_none=True)
  loss.backward()
  if grad_clip > 0:
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
  for opt in optimizers:
    opt.step()
  return loss.detach()
