"""Routing and expert computation of the DeepSeek-style MoE layer (`model.MoE` holds the params).

Pure functions on flat token rows. Names carry shapes: N tokens, A = N·k assignments,
E experts, C capacity (rows per expert), D model width, F expert width.

Dispatch:
  'dense'  every expert runs on every token; the top-k gates (zero elsewhere) weight the
           outputs. Exact and simple, but its cost grows with E, not with k: the reference.
  'sparse' the N·k token→expert assignments are sorted by expert and each expert runs on
           its own rows only, so routed FLOPs follow top-k. Two ways to run the groups:
             'capacity'   rows gathered into fixed [E, C, D] blocks, one batched matmul per
                          weight, scattered back; assignments past an expert's C rows are
                          dropped (counted). Static shapes: fast on CPU, and the form that
                          expert parallelism shards (E over the mesh's 'expert' axis).
             'ragged_dot' jax.lax.ragged_dot over the sorted rows: never drops; grouped
                          kernels on GPU/TPU, a slow per-group fallback on CPU.
           grouped='auto' takes ragged_dot on GPU/TPU and capacity on CPU (bench/moe.py
           measures both; see BENCHMARKS.md).

Balancing (DeepSeek-V3's auxiliary-loss-free scheme): a per-expert bias is added to the
scores for the top-k choice only; the gate values stay the unbiased scores. After every
step `update_bias` moves each bias by ±rate toward equal load.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

EXPERT_AXIS = 'expert'
# Never fewer rows per expert than this (or N): decoding a few tokens a step never drops.
MIN_CAPACITY = 32


def route(logits_NxE, bias_E, top_k: int, gate: str, norm_topk: bool = True,
          scale: float = 1.0, n_group: int = 1, topk_group: int = 1):
  """Gate values [N, k] and expert ids [N, k] of each token's top-k, and the scores [N, E].

  The bias (None = none) shifts only which experts are chosen; the gates are the
  unbiased scores (sigmoid scores renormalised over the chosen k when `norm_topk`, as in
  DeepSeek-V3), times `scale`. With n_group > 1 a token first keeps its topk_group best
  groups (a group's score: the sum of its best two biased scores) and chooses its k among
  their experts only: transformers' DeepseekV3TopkRouter, step for step.
  """
  logits_NxE = logits_NxE.astype(jnp.float32)
  if gate == 'softmax':
    scores_NxE = jax.nn.softmax(logits_NxE, axis=-1)
  else:
    scores_NxE = jax.nn.sigmoid(logits_NxE)
  choice_NxE = jax.lax.stop_gradient(scores_NxE)
  if bias_E is not None:
    choice_NxE = choice_NxE + jax.lax.stop_gradient(bias_E.astype(jnp.float32))
  if n_group > 1:
    n, e = choice_NxE.shape
    choice_NxGxM = choice_NxE.reshape(n, n_group, e // n_group)
    group_NxG = jnp.sum(jax.lax.top_k(choice_NxGxM, 2)[0], axis=-1)
    _, keep_NxT = jax.lax.top_k(group_NxG, topk_group)
    kept_NxG = jnp.any(jax.nn.one_hot(keep_NxT, n_group, dtype=bool), axis=1)
    choice_NxE = jnp.where(kept_NxG[:, :, None], choice_NxGxM, -jnp.inf).reshape(n, e)
  _, idx_Nxk = jax.lax.top_k(choice_NxE, top_k)
  gate_Nxk = jnp.take_along_axis(scores_NxE, idx_Nxk, axis=-1)
  if gate == 'sigmoid' and norm_topk:  # sigmoid scores are independent: renormalise the chosen k
    gate_Nxk = gate_Nxk / jnp.sum(gate_Nxk, axis=-1, keepdims=True)
  if scale != 1.0:
    gate_Nxk = gate_Nxk * scale
  return gate_Nxk, idx_Nxk, scores_NxE


def capacity(n_tokens: int, n_experts: int, top_k: int, factor: float) -> int:
  """Rows per expert: factor × the balanced share N·k/E (factor 0: N, which never drops)."""
  if factor <= 0:
    return n_tokens
  return min(n_tokens, max(MIN_CAPACITY, math.ceil(factor * n_tokens * top_k / n_experts)))


def grouped_impl(grouped: str, backend: str | None = None) -> str:
  """'capacity' or 'ragged_dot' for grouped='auto' on this backend (CPU: capacity)."""
  if grouped != 'auto':
    return grouped
  backend = backend or jax.default_backend()
  return 'capacity' if backend == 'cpu' else 'ragged_dot'


def expert_axis_size() -> int:
  """Size of the 'expert' axis of the mesh in context (jax.set_mesh), 1 without one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or EXPERT_AXIS not in mesh.axis_names:
    return 1
  return mesh.shape[EXPERT_AXIS]


def _on_experts(x_ExCx_):
  """Pins the leading (expert) axis to the mesh's 'expert' axis when there is one, and each
  expert's rows to the mesh's other axes (so no two devices run the same rows)."""
  if expert_axis_size() == 1:
    return x_ExCx_
  rest = tuple(a for a in jax.sharding.get_abstract_mesh().axis_names if a != EXPERT_AXIS)
  return jax.lax.with_sharding_constraint(x_ExCx_, P(EXPERT_AXIS, rest or None))


def _swiglu(x, w_gate, w_up, w_down, spec: str):
  h = jax.nn.silu(jnp.einsum(spec[0], x, w_gate)) * jnp.einsum(spec[0], x, w_up)
  return jnp.einsum(spec[1], h, w_down)


def dense_experts(x_NxD, gate_Nxk, idx_Nxk, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD):
  """Every expert on every token, weighted by the (mostly zero) gates: [N, D]."""
  e = w_gate_ExDxF.shape[0]
  gates_NxE = jnp.einsum('nk,nke->ne', gate_Nxk, jax.nn.one_hot(idx_Nxk, e, dtype=gate_Nxk.dtype))
  y_NxExD = _swiglu(x_NxD, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, ('nd,edf->nef', 'nef,efd->ned'))
  return jnp.einsum('ned,ne->nd', y_NxExD, gates_NxE.astype(x_NxD.dtype))


def _sort_assignments(idx_Nxk, n_experts: int):
  """Assignments (token-major) sorted by expert: order, per-expert counts, rank in expert."""
  expert_A = idx_Nxk.reshape(-1)
  a = expert_A.shape[0]
  order_A = jnp.argsort(expert_A, stable=True)
  counts_E = jnp.bincount(expert_A, length=n_experts)
  starts_E = jnp.cumsum(counts_E) - counts_E
  rank_sorted_A = jnp.arange(a) - starts_E[expert_A[order_A]]
  rank_A = jnp.zeros(a, jnp.int32).at[order_A].set(rank_sorted_A.astype(jnp.int32))
  return expert_A, order_A, counts_E, rank_A


def _combine(y_AxD, gate_Nxk):
  n, k = gate_Nxk.shape
  return jnp.einsum('nkd,nk->nd', y_AxD.reshape(n, k, -1), gate_Nxk.astype(y_AxD.dtype))


def capacity_experts(x_NxD, gate_Nxk, idx_Nxk, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD,
                     capacity_rows: int):
  """Sorted rows in [E, C, D] blocks, one batched matmul per weight: ([N, D], dropped count).

  Within an expert, earlier tokens come first; assignments past C rows are dropped (their
  output is zero, the token keeps its other experts and the shared ones).
  """
  n, k = idx_Nxk.shape
  e, d = w_gate_ExDxF.shape[0], x_NxD.shape[-1]
  c = capacity_rows
  expert_A, _, _, rank_A = _sort_assignments(idx_Nxk, e)
  keep_A = rank_A < c
  slot_A = jnp.where(keep_A, expert_A * c + rank_A, e * c)       # e·c: the zero row
  token_for_slot = jnp.full(e * c + 1, n, jnp.int32).at[slot_A].set(jnp.arange(n * k) // k)
  x_pad = jnp.concatenate([x_NxD, jnp.zeros((1, d), x_NxD.dtype)])
  x_ExCxD = _on_experts(x_pad[token_for_slot[:e * c]].reshape(e, c, d))
  y_ExCxD = _on_experts(_swiglu(x_ExCxD, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD,
                                ('ecd,edf->ecf', 'ecf,efd->ecd')))
  y_pad = jnp.concatenate([y_ExCxD.reshape(e * c, d), jnp.zeros((1, d), y_ExCxD.dtype)])
  return _combine(y_pad[slot_A], gate_Nxk), jnp.sum(~keep_A)


def ragged_experts(x_NxD, gate_Nxk, idx_Nxk, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD):
  """Sorted rows through jax.lax.ragged_dot (one group per expert): [N, D]; never drops."""
  n, k = idx_Nxk.shape
  _, order_A, counts_E, _ = _sort_assignments(idx_Nxk, w_gate_ExDxF.shape[0])
  counts_E = counts_E.astype(jnp.int32)
  x_AxD = x_NxD[order_A // k]
  h_AxF = jax.nn.silu(jax.lax.ragged_dot(x_AxD, w_gate_ExDxF, counts_E)) * \
      jax.lax.ragged_dot(x_AxD, w_up_ExDxF, counts_E)
  y_sorted_AxD = jax.lax.ragged_dot(h_AxF, w_down_ExFxD, counts_E)
  y_AxD = jnp.zeros_like(y_sorted_AxD).at[order_A].set(y_sorted_AxD)
  return _combine(y_AxD, gate_Nxk)


def routed_experts(x_NxD, gate_Nxk, idx_Nxk, weights, dispatch: str, grouped: str,
                   capacity_factor: float):
  """The routed experts' gated output [N, D] and the number of dropped assignments."""
  if dispatch == 'dense':
    return dense_experts(x_NxD, gate_Nxk, idx_Nxk, *weights), jnp.int32(0)
  impl = grouped_impl(grouped)
  if impl == 'ragged_dot' and expert_axis_size() == 1:
    return ragged_experts(x_NxD, gate_Nxk, idx_Nxk, *weights), jnp.int32(0)
  n, k = idx_Nxk.shape
  c = capacity(n, weights[0].shape[0], k, capacity_factor)
  return capacity_experts(x_NxD, gate_Nxk, idx_Nxk, *weights, c)


def update_bias(bias_E, load_E, rate: float):
  """One DeepSeek-V3 bias step: +rate for experts under the mean load, -rate over it."""
  return bias_E + rate * jnp.sign(jnp.mean(load_E) - load_E).astype(bias_E.dtype)


def balance_params(params, moe_layers: list[int], load_LxE, rate: float):
  """GPT params with each MoE layer's expert_bias moved by `update_bias` (load_LxE: row per
  MoE layer, in `moe_layers` order); every other leaf as it was."""
  params = dict(params)
  for row, i in enumerate(moe_layers):
    block = dict(params[f'h_{i}'])
    block['moe'] = dict(block['moe'], expert_bias=update_bias(
        block['moe']['expert_bias'], load_LxE[row], rate))
    params[f'h_{i}'] = block
  return params


def load_ratio(load_E) -> float:
  """Max/min expert load (inf when an expert got nothing)."""
  lo, hi = float(min(load_E)), float(max(load_E))
  return hi / lo if lo > 0 else float('inf')
