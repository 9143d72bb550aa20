"""The optimiser: AdamW under linear warmup + cosine decay, with global-norm clipping.

The schedule is where ORIGIN.md went wrong (a fine-tuning rate with no warmup): the peak
rate is reached only after `warmup_steps`, then decays along a cosine to
`min_lr_ratio · lr` at the last step.
"""

from __future__ import annotations

import jax
import optax


def schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to lr, cosine to min_lr_ratio·lr at `total_steps`."""
  # optax's end_value is an absolute rate, not a fraction of the peak.
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim_cfg.lr, warmup_steps=optim_cfg.warmup_steps,
      decay_steps=total_steps, end_value=optim_cfg.lr * optim_cfg.min_lr_ratio)


def decay_mask(params, decay_embeddings: bool = False):
  """True for the weights that get weight decay: matrices (>= 2-D), not biases or norms.

  Embedding tables are matrices too; decaying them is a choice (`decay_embeddings`).
  """
  def decide(path, leaf):
    names = {getattr(p, 'key', None) for p in path}
    if names & {'wte', 'wpe'} and not decay_embeddings:
      return False
    return leaf.ndim >= 2
  return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
  """AdamW with the schedule above, decoupled weight decay on `decay_mask`, and clipping."""
  adamw = optax.adamw(
      schedule(optim_cfg, total_steps), b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
      weight_decay=optim_cfg.weight_decay,
      mask=lambda p: decay_mask(p, optim_cfg.decay_embeddings))
  if optim_cfg.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip), adamw)
  return adamw
