"""The optimiser: AdamW (or Muon + AdamW) under linear warmup + a decay, with clipping.

The peak rate is reached only after `warmup_steps` (a pretraining-sized peak with no warmup
diverges), then decays to `min_lr_ratio · lr` at the last step: along a cosine
(`schedule='cosine'`), or held and then decayed linearly over the last `decay_fraction` of the
steps (`schedule='wsd'`, warmup-stable-decay as in modded-nanogpt's warmdown).

`optim.name = 'muon'` updates the 2-D matrices inside the blocks with Muon (momentum, then
the update's orthogonal factor by a Newton-Schulz iteration; Jordan et al. 2024) at its own
peak `muon_lr`, and everything else -- embeddings, head, norms, biases -- with Adam at `lr`
(optax.contrib.muon; its Adam part has no weight decay).
"""

from __future__ import annotations

import jax
import optax


def schedule(optim_cfg, total_steps: int, peak: float | None = None) -> optax.Schedule:
  """Linear warmup from 0 to `peak` (default lr), then cosine (or wsd: hold, then linear) to
  min_lr_ratio·peak at `total_steps`. A run no longer than its warmup is all warmup: the
  rate rises linearly towards `peak` and the run ends before reaching it (a short smoke run of
  a config made for longer ones, as HF's Trainer does too)."""
  peak = optim_cfg.lr if peak is None else peak
  if optim_cfg.warmup_steps >= total_steps:
    return optax.linear_schedule(0.0, peak, optim_cfg.warmup_steps)
  if optim_cfg.get('schedule', 'cosine') == 'wsd':
    warmup = optim_cfg.warmup_steps
    decay = max(1, min(round(optim_cfg.decay_fraction * total_steps), total_steps - warmup))
    hold = total_steps - warmup - decay
    parts = [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak),
             optax.linear_schedule(peak, peak * optim_cfg.min_lr_ratio, decay)]
    return optax.join_schedules(parts, [warmup, warmup + hold])
  # optax's end_value is an absolute rate, not a fraction of the peak.
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=optim_cfg.warmup_steps,
      decay_steps=total_steps, end_value=peak * optim_cfg.min_lr_ratio)


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


def muon_dims(params):
  """Muon's dimension numbers for the weights it updates, None for the rest.

  Muon takes the matrices inside the blocks (an MoE layer's [E, in, out] expert stacks as E
  matrices); embeddings, the head, norms and biases go to Adam.
  """
  def decide(path, leaf):
    if not str(getattr(path[0], 'key', '')).startswith('h_') or leaf.ndim < 2:
      return None
    return optax.contrib.MuonDimensionNumbers(leaf.ndim - 2, leaf.ndim - 1)
  return jax.tree_util.tree_map_with_path(decide, params)


def _muon(optim_cfg, total_steps: int) -> optax.GradientTransformation:
  """Muon on the block matrices, Adam (at `lr`, no weight decay) on everything else."""
  return optax.contrib.muon(
      schedule(optim_cfg, total_steps, optim_cfg.muon_lr), beta=optim_cfg.muon_beta,
      weight_decay=optim_cfg.weight_decay, adam_learning_rate=schedule(optim_cfg, total_steps),
      adam_b1=optim_cfg.b1, adam_b2=optim_cfg.b2, eps=optim_cfg.eps,
      muon_weight_dimension_numbers=muon_dims)


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
  """AdamW (or Muon + AdamW) with the schedule above, weight decay, and clipping."""
  if optim_cfg.name == 'muon':
    opt = _muon(optim_cfg, total_steps)
  else:
    opt = optax.adamw(
        schedule(optim_cfg, total_steps), b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay,
        mask=lambda p: decay_mask(p, optim_cfg.decay_embeddings))
  if optim_cfg.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip), opt)
  return opt
