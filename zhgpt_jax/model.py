"""The GPT: GPT-2 by default, Llama-style and DeepSeek-style MoE variants by config switch.

A Flax Linen module whose params are a plain pytree and whose `apply` is pure.

Shape letters: B batch, L query length, S key length (cache slots when decoding), D model
width, N query heads, K key/value heads, H head width, F hidden width, E experts, k of them
chosen, V vocab (padded).

Parameter names follow GPT-2's layout (`wte`, `wpe`, `h_{i}`, `ln_f`) so the export mapping
to HuggingFace stays a table, not a puzzle.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zhgpt_jax import attention
from zhgpt_jax import gpt_config
from zhgpt_jax import moe as moe_lib
from zhgpt_jax.attention import dense as _dense, init as _init, norm as _norm
from zhgpt_jax.attention import residual_std as _residual_std
from zhgpt_jax.config import UserError
from zhgpt_jax.gpt_config import GPTConfig


def param_diffs(old: GPTConfig, new: GPTConfig) -> list[str]:
  """'model.<field>: old -> new' for every parameter field (gpt_config.param_paths) that differs."""
  get = gpt_config.get
  return [f'model.{p}: {get(old, p)!r} -> {get(new, p)!r}' for p in gpt_config.param_paths()
          if get(old, p) != get(new, p)]


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def effective_attention(requested: str) -> str:
  """The attention implementation this backend runs: 'cudnn' needs a GPU, else 'xla'."""
  return 'xla' if requested == 'cudnn' and jax.default_backend() != 'gpu' else requested


def model_config(model_cfg, vocab_size: int) -> GPTConfig:
  """The GPTConfig of `config.model` (every key copied by name; keys an older saved config
  lacks keep their defaults) and the tokenizer's vocab size, its zeros derived.

  model.vocab_size and model.mlp_hidden, when set (e.g. from init_from=hf:DIR), are taken
  as they are; 0 derives them from the tokenizer and mlp_ratio. Raises UserError when the
  tokenizer has more tokens than model.vocab_size rows. The attention is the one this
  backend runs (`effective_attention`).
  """
  cfg = gpt_config.from_flat(gpt_config.flatten(model_cfg))
  hidden = cfg.mlp_hidden or int(cfg.mlp_ratio * cfg.d_model)
  if cfg.mlp in ('swiglu', 'moe') and not cfg.mlp_hidden:
    # Two input matrices instead of one: 2/3 of the width keeps the parameter count (Llama).
    hidden = _round_up(int(2 * hidden / 3), 64)
  rows = cfg.vocab_size or _round_up(vocab_size, cfg.vocab_multiple)
  if rows < vocab_size:
    raise UserError(f'config.model.vocab_size={rows} is smaller than the tokenizer '
                     f'({vocab_size} tokens)')
  moe = dataclasses.replace(
      cfg.moe, expert_hidden=cfg.moe.expert_hidden or max(64, _round_up(hidden // cfg.moe.top_k, 64)))
  return dataclasses.replace(
      cfg, vocab_size=rows, real_vocab_size=vocab_size, n_kv_head=cfg.n_kv_head or cfg.n_head,
      mlp_hidden=hidden, attention=effective_attention(cfg.attention), moe=moe)


def softcap(logits: jax.Array, cap: float) -> jax.Array:
  """cap · tanh(logits / cap), logits unchanged when cap is 0 (model.logit_softcap): every
  logit stays in (-cap, cap), near-linear well inside it (Gemma 2; modded-nanogpt)."""
  return cap * jnp.tanh(logits / cap) if cap else logits


class MLP(nn.Module):
  """GELU (GPT-2), ReLU² (Primer; modded-nanogpt) or SwiGLU (Llama) feed-forward."""
  cfg: GPTConfig
  hidden: int
  train: bool = False
  bias: bool | None = None

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    if cfg.mlp in ('gelu', 'relu2'):
      h_BxLxF = _dense(cfg, self.hidden, 'fc', bias=self.bias)(x_BxLxD)
      h_BxLxF = (nn.gelu(h_BxLxF, approximate=True) if cfg.mlp == 'gelu'
                 else jnp.square(nn.relu(h_BxLxF)))
      y_BxLxD = _dense(cfg, cfg.d_model, 'proj', std=_residual_std(cfg), bias=self.bias)(h_BxLxF)
    else:
      gate_BxLxF = _dense(cfg, self.hidden, 'gate', bias=self.bias)(x_BxLxD)
      up_BxLxF = _dense(cfg, self.hidden, 'up', bias=self.bias)(x_BxLxD)
      y_BxLxD = _dense(cfg, cfg.d_model, 'down', std=_residual_std(cfg), bias=self.bias)(
          nn.silu(gate_BxLxF) * up_BxLxF)
    return nn.Dropout(cfg.dropout, deterministic=not self.train)(y_BxLxD)


class MoE(nn.Module):
  """DeepSeekMoE: fine-grained routed SwiGLU experts plus always-on shared experts.

  Routing and the expert computation live in `moe.py`: dispatch 'sparse' (default) runs
  each expert on its own tokens only (routed FLOPs follow top-k), 'dense' runs every expert
  on every token (the exact reference). balance='bias' adds the param `expert_bias` [E]:
  it shifts the top-k choice only, gets no gradient, and the train step moves it toward
  equal load (DeepSeek-V3); it stays part of the model, so sampling routes as training did.
  """
  cfg: GPTConfig
  train: bool = False

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    e, f, d = cfg.moe.n_routed, cfg.moe.expert_hidden, cfg.d_model
    b, l, _ = x_BxLxD.shape
    logits_NxE = _dense(cfg, e, 'router', bias=False)(x_BxLxD).reshape(b * l, e)
    bias_E = None
    if cfg.moe.balance == 'bias':
      bias_E = self.param('expert_bias', nn.initializers.zeros, (e,), jnp.float32)
    gate_Nxk, idx_Nxk, scores_NxE = moe_lib.route(
        logits_NxE, bias_E, cfg.moe.top_k, cfg.moe.gate, norm_topk=cfg.moe.norm_topk,
        scale=cfg.moe.routed_scale, n_group=cfg.moe.n_group, topk_group=cfg.moe.topk_group)

    weights = (self.param('w_gate', _init(0.02), (e, d, f), jnp.float32),
               self.param('w_up', _init(0.02), (e, d, f), jnp.float32),
               self.param('w_down', _init(_residual_std(cfg)), (e, f, d), jnp.float32))
    y_NxD, dropped = moe_lib.routed_experts(
        x_BxLxD.astype(cfg.dtype).reshape(b * l, d), gate_Nxk, idx_Nxk,
        [w.astype(cfg.dtype) for w in weights], cfg.moe.dispatch, cfg.moe.grouped,
        cfg.moe.capacity_factor)
    y_BxLxD = y_NxD.reshape(b, l, d)
    if cfg.moe.n_shared:
      # n_shared experts of width f are one SwiGLU of width n_shared·f.
      shared_BxLxD = MLP(dataclasses.replace(cfg, mlp='swiglu'), cfg.moe.n_shared * f,
                         bias=False, name='shared')(x_BxLxD)
      if cfg.moe.shared_gate:
        shared_BxLxD = shared_BxLxD * nn.sigmoid(
            _dense(cfg, 1, 'shared_gate', bias=False)(x_BxLxD))
      y_BxLxD = y_BxLxD + shared_BxLxD

    # Switch-Transformer balance loss: E · Σ_e (fraction of top-k picks to e) · (mean score of e);
    # it is 1 at uniform routing, its minimum. z-loss keeps router logits small (ST-MoE).
    load_E = jnp.bincount(idx_Nxk.reshape(-1), length=e).astype(jnp.float32) / idx_Nxk.size
    probs_E = jnp.mean(scores_NxE / jnp.sum(scores_NxE, -1, keepdims=True), axis=0)
    aux = dict(balance=e * jnp.sum(load_E * probs_E),
               z=jnp.mean(jax.nn.logsumexp(logits_NxE.astype(jnp.float32), axis=-1) ** 2),
               load=load_E, dropped=dropped.astype(jnp.float32) / idx_Nxk.size)
    return nn.Dropout(cfg.dropout, deterministic=not self.train)(y_BxLxD), aux


class Block(nn.Module):
  cfg: GPTConfig
  moe: bool = False
  train: bool = False

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, mask_Bx1xLxS, cache):
    cfg = self.cfg
    y_BxLxD, new_cache = attention.layer(cfg, self.train, 'attn')(
        _norm(cfg, 'ln_1')(x_BxLxD), positions_BxL, mask_Bx1xLxS, cache)
    x_BxLxD = x_BxLxD + y_BxLxD
    h_BxLxD = _norm(cfg, 'ln_2')(x_BxLxD)
    if self.moe:
      y_BxLxD, aux = MoE(cfg, self.train, name='moe')(h_BxLxD)
    else:
      y_BxLxD, aux = MLP(cfg, cfg.mlp_hidden, self.train, name='mlp')(h_BxLxD), {}
    return x_BxLxD + y_BxLxD, new_cache, aux


class GPT(nn.Module):
  """The language model. `__call__` returns float32 logits and a dict of auxiliary outputs.

  Training: `apply(params, tokens_BxL, train=True, rngs={'dropout': key})`; packed rows pass
  `segment_ids_BxL` (0 = padding) and `positions_BxL`. Decoding passes `cache` (from
  `init_cache`) and `kv_mask_BxS` (which cache slots hold real tokens); aux['cache'] is the
  updated cache. `hidden=True` returns the final normed hidden states [B, L, D] instead of
  logits, with the head matrix in aux['head_DxV'] (for `loss.chunked_cross_entropy`, which
  applies cfg.logit_softcap itself, and `head_logits`).
  """
  cfg: GPTConfig

  @nn.compact
  def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, cache=None,
               kv_mask_BxS=None, train: bool = False, hidden: bool = False):
    cfg = self.cfg
    b, l = tokens_BxL.shape
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(l), (b, l))
    wte = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=_init(0.02),
                   param_dtype=jnp.float32, name='wte')
    x_BxLxD = wte(tokens_BxL)
    if cfg.position == 'learned':
      x_BxLxD = x_BxLxD + nn.Embed(cfg.seq_len, cfg.d_model, embedding_init=_init(0.01),
                                   param_dtype=jnp.float32, name='wpe')(positions_BxL)
    x_BxLxD = nn.Dropout(cfg.dropout, deterministic=not train)(x_BxLxD).astype(cfg.dtype)

    mask_Bx1xLxS = None
    if cache is not None:
      # Query at absolute slot index+i sees valid slots up to and including itself.
      slots_S = jnp.arange(kv_mask_BxS.shape[1])
      query_slots_L = cache[0]['index'] + jnp.arange(l)
      causal_LxS = slots_S[None, :] <= query_slots_L[:, None]
      mask_Bx1xLxS = (causal_LxS[None] & kv_mask_BxS[:, None, :])[:, None]
    elif segment_ids_BxL is not None:
      same_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
      causal_LxL = jnp.tril(jnp.ones((l, l), bool))
      mask_Bx1xLxS = (same_BxLxL & causal_LxL[None])[:, None]

    block_cls = nn.remat(Block) if cfg.remat == 'block' and train else Block
    new_cache, moe_aux = [], []
    for i in range(cfg.n_layer):
      # The layers' caches advance together: layer 0's index serves all of them, so a decode
      # step computes the write position and the masks derived from it once, not per layer.
      layer_cache = None if cache is None else dict(cache[i], index=cache[0]['index'])
      x_BxLxD, layer_cache, aux = block_cls(cfg, cfg.is_moe_layer(i), train, name=f'h_{i}')(
          x_BxLxD, positions_BxL, mask_Bx1xLxS, layer_cache)
      new_cache.append(layer_cache)
      if aux:
        moe_aux.append(aux)
    x_BxLxD = _norm(cfg, 'ln_f')(x_BxLxD)
    if cfg.tie_embeddings:
      head_DxV = wte.embedding.T
    else:
      head_DxV = self.param('lm_head', _init(0.02), (cfg.d_model, cfg.vocab_size), jnp.float32)
    out: dict[str, Any] = {}
    if cache is not None:
      out['cache'] = new_cache
    if moe_aux:
      out['moe_balance'] = jnp.mean(jnp.stack([a['balance'] for a in moe_aux]))
      out['moe_z'] = jnp.mean(jnp.stack([a['z'] for a in moe_aux]))
      out['moe_load'] = jnp.stack([a['load'] for a in moe_aux])   # [moe layers, E]
      out['moe_dropped'] = jnp.mean(jnp.stack([a['dropped'] for a in moe_aux]))
    if hidden:   # the loss applies the head itself, a chunk of tokens at a time
      out['head_DxV'] = head_DxV
      return x_BxLxD, out
    return head_logits(cfg, x_BxLxD, head_DxV), out


def head_logits(cfg: GPTConfig, x_XxD: jax.Array, head_DxV: jax.Array) -> jax.Array:
  """Float32 logits [..., V] of final (normed) hidden states [..., D]: the head matmul and
  the softcap, as GPT returns them; scoring applies it to the positions it needs only."""
  logits_XxV = jnp.einsum('...d,dv->...v', x_XxD, head_DxV.astype(cfg.dtype),
                          preferred_element_type=jnp.float32)
  return softcap(logits_XxV, cfg.logit_softcap)


def init_cache(cfg: GPTConfig, batch: int, size: int, dtype=jnp.float32) -> list[dict]:
  """An empty KV cache of `size` slots per layer (attention.init_cache: its entries follow
  cfg.attention_kind)."""
  return attention.init_cache(cfg, batch, size, dtype)


def init_params(cfg: GPTConfig, rng: jax.Array) -> Any:
  """Float32 parameters for `cfg`, a plain nested dict."""
  tokens = jnp.zeros((1, min(8, cfg.seq_len)), jnp.int32)
  return jax.jit(GPT(cfg).init)(rng, tokens)['params']


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def active_params(cfg: GPTConfig, params) -> int:
  """Parameters one token uses: all, less the routed experts it is not sent to."""
  n = count_params(params)
  per_expert = 3 * cfg.d_model * cfg.moe.expert_hidden
  n_moe_layers = len(cfg.moe_layers())
  # The expert bias (balance='bias') is a routing offset, not a weight a token multiplies.
  n -= n_moe_layers * cfg.moe.n_routed * (cfg.moe.balance == 'bias')
  return n - n_moe_layers * (cfg.moe.n_routed - cfg.moe.top_k) * per_expert


def routed_flops_per_token(cfg: GPTConfig) -> float:
  """Training FLOPs per token in the routed experts (6 × the top-k experts' weights)."""
  return 6.0 * len(cfg.moe_layers()) * cfg.moe.top_k * 3 * cfg.d_model * cfg.moe.expert_hidden


def flops_per_token(cfg: GPTConfig, params) -> float:
  """Training FLOPs per token: 6N (matmuls, fwd+bwd) + 12·L·D·T (attention scores), as in PaLM.

  N excludes the lookup tables: the position table, and the token table when the head is a
  separate matrix (tied, the table is also the head's matmul).
  """
  n = active_params(cfg, params)
  if cfg.position == 'learned':
    n -= cfg.seq_len * cfg.d_model
  if not cfg.tie_embeddings:
    n -= cfg.vocab_size * cfg.d_model
  return 6 * n + 12 * cfg.n_layer * cfg.d_model * cfg.seq_len
