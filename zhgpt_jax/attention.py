"""The GPT's attention layers and their KV caches, and the layer helpers model.py shares.

  'mha'  multi-head attention; grouped-query when n_kv_head < n_head (GPT-2, Llama, Qwen2);
         with qk_norm, each head's query and key RMS-normed before RoPE (Qwen3).
         The cache holds every layer's keys and values: 2 · K · H numbers a token a layer.
  'mla'  DeepSeek-V2/V3's multi-head latent attention. Keys and values come from one
         low-rank latent c = RMSNorm(x · W_kv_a) of width R (kv_lora_rank), expanded per head
         by W_kv_b into a no-position key part (qk_nope_head_dim) and the value (v_head_dim);
         the position lives in a separate rotary key of qk_rope_head_dim, shared by all heads
         (decoupled RoPE). The query comes from x directly, or through its own latent of width
         q_lora_rank. The cache holds only c and the rotary key: R + rope numbers a token a
         layer. Decoding never expands them: W_kv_b's key half is absorbed into the query and
         its value half applied after the attention ("weight absorption", DeepSeek-V2 §2.1),
         so a step reads the cache once.

Both take `cfg` (a model.GPTConfig) and return (output [B, L, D], the updated cache or None).
A cache is a list (one dict a layer) of arrays [B, ..., S, W] (batch first, cache slot second
to last: 'mha' keeps [B, K, S, H], 'mla' [B, S, W]) plus 'index', the next slot to write;
`init_cache` builds an empty one for either kind. With the slot beside the head width a decode
step attends over the cache as it lies: no per-step transpose into the dot's layout.

Shape letters: B batch, L query length, S key length (cache slots when decoding), D model
width, N query heads, K key/value heads, G query heads a key/value head (N / K), H head
width, T keys a cached call attends to (S cache slots + its L new ones), R kv latent width,
Q query latent width, P rotary key width (qk_rope_head_dim), C no-position key width
(qk_nope_head_dim), U value width (v_head_dim).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# DeepSeek's latent RMSNorms use their own epsilon (transformers' DeepseekV3RMSNorm default),
# not rms_norm_eps.
LATENT_NORM_EPS = 1e-6


def init(std: float):
  return nn.initializers.normal(stddev=std)


def residual_std(cfg) -> float:
  # GPT-2: each block adds two residual branches; scaling their output projections by
  # 1/sqrt(2·n_layer) keeps the residual stream's variance flat with depth. residual_init=0
  # starts every block as the identity, so the untrained model is a bigram model.
  return cfg.residual_init * 0.02 / math.sqrt(2 * cfg.n_layer)


def dense(cfg, features: int, name: str, std: float = 0.02, bias: bool | None = None):
  return nn.Dense(features, use_bias=cfg.bias if bias is None else bias, dtype=cfg.dtype,
                  param_dtype=jnp.float32, kernel_init=init(std), name=name)


def norm(cfg, name: str):
  if cfg.norm == 'rmsnorm':
    return nn.RMSNorm(epsilon=cfg.norm_eps, dtype=cfg.dtype, param_dtype=jnp.float32, name=name)
  return nn.LayerNorm(epsilon=cfg.norm_eps, use_bias=cfg.bias, dtype=cfg.dtype,
                      param_dtype=jnp.float32, name=name)


def _head_norm(cfg, name: str):
  """RMSNorm over a head's width (the last axis), one scale [H] shared by the heads."""
  return nn.RMSNorm(epsilon=cfg.norm_eps, dtype=cfg.dtype, param_dtype=jnp.float32, name=name)


def _latent_norm(cfg, name: str):
  return nn.RMSNorm(epsilon=LATENT_NORM_EPS, dtype=cfg.dtype, param_dtype=jnp.float32, name=name)


def rope(x_BxLxNxH: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding, rotate-half layout (HF Llama's convention)."""
  h = x_BxLxNxH.shape[-1]
  inv_freq_H2 = 1.0 / theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h)
  angle_BxLxH2 = positions_BxL[..., None].astype(jnp.float32) * inv_freq_H2
  cos_BxLx1xH = jnp.cos(jnp.concatenate([angle_BxLxH2] * 2, -1))[:, :, None, :]
  sin_BxLx1xH = jnp.sin(jnp.concatenate([angle_BxLxH2] * 2, -1))[:, :, None, :]
  x = x_BxLxNxH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * cos_BxLx1xH + rotated * sin_BxLx1xH).astype(x_BxLxNxH.dtype)


def _write(cache: dict, name: str, x_Bx_xLxW: jax.Array) -> jax.Array:
  """The cache entry `name` with this step's rows written at cache['index'] (axis -2)."""
  return jax.lax.dynamic_update_slice_in_dim(
      cache[name], x_Bx_xLxW.astype(cache[name].dtype), cache['index'], -2)


def _attend(cfg, q_BxLxNxH, k_BxSxKxH, v_BxSxKxU, mask_Bx1xLxS, scale: float | None = None):
  """Softmax attention (scale None: 1/sqrt(H)); q/k and v may have different head widths
  (MLA): the narrower side is zero-padded, which changes no score and no output."""
  h, u = q_BxLxNxH.shape[-1], v_BxSxKxU.shape[-1]
  pad = lambda x, w: jnp.pad(x, [(0, 0)] * 3 + [(0, w - x.shape[-1])]) if x.shape[-1] < w else x
  width = max(h, u)
  q, k, v = (pad(x, width).astype(q_BxLxNxH.dtype) for x in (q_BxLxNxH, k_BxSxKxH, v_BxSxKxU))
  if mask_Bx1xLxS is None:
    y = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                     implementation=cfg.attention)
  else:
    # Packed segments and cached decoding need an explicit mask: XLA's implementation.
    y = jax.nn.dot_product_attention(q, k, v, scale=scale, mask=mask_Bx1xLxS,
                                     implementation='xla')
  return y[..., :u]


def _attend_cache(cfg, q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, cache: dict, mask_Bx1xLxS):
  """Softmax attention of L new queries over the cache's first cache['index'] slots (before
  this call writes to it) and over the L new keys/values; mask_Bx1xLxS covers all S slots,
  the new tokens' at [index, index + L).

  The same scores, mask and softmax as `_attend` over the written cache, split in two so that
  the dots read the [B, K, S, H] cache as it lies (XLA's CPU dot wants S or H as it is) and
  the cache write has no reader: XLA writes it in place instead of copying the cache every
  decode step. Query head n reads key/value head n // (N / K) (grouped-query).
  """
  b, l, n, h = q_BxLxNxH.shape
  kv, g = k_BxLxKxH.shape[2], n // k_BxLxKxH.shape[2]
  slots_S = jnp.arange(cache['k'].shape[-2])
  q_BxLxKxGxH = q_BxLxNxH.reshape(b, l, kv, g, h)
  q_BxKxHxGL = q_BxLxKxGxH.transpose(0, 2, 4, 3, 1).reshape(b, kv, h, g * l)
  k_BxKxSxH, v_BxKxSxH = (cache[x].astype(cfg.dtype) for x in ('k', 'v'))
  batch = ((0, 1), (0, 1))
  scores_BxKxSxGL = jax.lax.dot_general(k_BxKxSxH, q_BxKxHxGL, (((3,), (2,)), batch),
                                        preferred_element_type=jnp.float32)
  scores_BxKxGxLxT = jnp.concatenate([
      scores_BxKxSxGL.swapaxes(2, 3).reshape(b, kv, g, l, -1),
      jnp.einsum('blkgh,bmkh->bkglm', q_BxLxKxGxH, k_BxLxKxH,
                 preferred_element_type=jnp.float32)], axis=-1) * h ** -0.5
  mask_Bx1xLxT = jnp.concatenate([
      mask_Bx1xLxS & (slots_S < cache['index']),
      jax.lax.dynamic_slice_in_dim(mask_Bx1xLxS, cache['index'], l, axis=-1)], axis=-1)
  scores_BxKxGxLxT = jnp.where(mask_Bx1xLxT[:, :, None], scores_BxKxGxLxT,   # jax's xla
                               -0.7 * jnp.finfo(jnp.float32).max)          # mask value
  probs_BxKxGxLxT = jax.nn.softmax(scores_BxKxGxLxT, axis=-1).astype(cfg.dtype)
  y_BxKxGLxH = jax.lax.dot_general(probs_BxKxGxLxT[..., :-l].reshape(b, kv, g * l, -1),
                                   v_BxKxSxH, (((3,), (2,)), batch))
  y_BxLxKxGxH = (
      y_BxKxGLxH.reshape(b, kv, g, l, h).transpose(0, 3, 1, 2, 4)
      + jnp.einsum('bkglm,bmkh->blkgh', probs_BxKxGxLxT[..., -l:], v_BxLxKxH.astype(cfg.dtype)))
  return y_BxLxKxGxH.reshape(b, l, n, h)


class Attention(nn.Module):
  """Multi-head / grouped-query attention ('mha')."""
  cfg: Any
  train: bool = False

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, mask_Bx1xLxS, cache):
    cfg = self.cfg
    n, k, h = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    b, l, _ = x_BxLxD.shape
    qkv_bias = cfg.bias or cfg.qkv_bias
    q_BxLxNxH = dense(cfg, n * h, 'q', bias=qkv_bias)(x_BxLxD).reshape(b, l, n, h)
    k_BxLxKxH = dense(cfg, k * h, 'k', bias=qkv_bias)(x_BxLxD).reshape(b, l, k, h)
    v_BxLxKxH = dense(cfg, k * h, 'v', bias=qkv_bias)(x_BxLxD).reshape(b, l, k, h)
    if cfg.qk_norm:   # before RoPE and the cache write, as Qwen3 (a cached key is a normed key)
      q_BxLxNxH = _head_norm(cfg, 'q_norm')(q_BxLxNxH)
      k_BxLxKxH = _head_norm(cfg, 'k_norm')(k_BxLxKxH)
    if cfg.position == 'rope':
      q_BxLxNxH = rope(q_BxLxNxH, positions_BxL, cfg.rope_theta)
      k_BxLxKxH = rope(k_BxLxKxH, positions_BxL, cfg.rope_theta)
    if cache is None:
      y_BxLxNxH = _attend(cfg, q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, mask_Bx1xLxS)
      new_cache = None
    else:
      # Decoding: attend over the cache and this step's keys/values, then write those at
      # cache['index'].
      y_BxLxNxH = _attend_cache(cfg, q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, cache, mask_Bx1xLxS)
      # 0 x an output value: the write waits for the reads above. XLA orders the in-place
      # cache write after them only through a data dependency; without one it copies both
      # cache entries every step. (A non-finite value counts as 0: one row's inf or NaN must
      # not reach the other rows' caches.)
      y = y_BxLxNxH[0, 0, 0, 0]
      after = 0.0 * jnp.where(jnp.isfinite(y), y, 0.0)
      t = lambda x_BxLxKxH: jnp.swapaxes(x_BxLxKxH, 1, 2) + after
      new_cache = dict(k=_write(cache, 'k', t(k_BxLxKxH)), v=_write(cache, 'v', t(v_BxLxKxH)),
                       index=cache['index'] + l)
    y_BxLxD = dense(cfg, cfg.d_model, 'o', std=residual_std(cfg))(y_BxLxNxH.reshape(b, l, n * h))
    return nn.Dropout(cfg.dropout, deterministic=not self.train)(y_BxLxD), new_cache


class _Kernel(nn.Module):
  """A Dense layer's kernel alone ([in, out], at <name>/kernel like nn.Dense's): MLA reads
  W_kv_b as a matrix to absorb it when decoding."""
  shape: tuple[int, int]

  @nn.compact
  def __call__(self):
    return self.param('kernel', init(0.02), self.shape, jnp.float32)


class MLA(nn.Module):
  """Multi-head latent attention ('mla'), DeepSeek-V2/V3's (transformers' DeepseekV3Attention).

  Params: q [D, N·(C+P)] (or q_a [D, Q], q_a_norm, q_b [Q, N·(C+P)] with q_lora_rank),
  kv_a [D, R+P], kv_a_norm, kv_b [R, N·(C+U)], o [N·U, D]. Each head's query is [no-position
  C | rotary P]; each head's kv_b columns are [key C | value U]. RoPE is our rotate-half
  layout; export permutes the rotary columns to DeepSeek's interleaved one.
  """
  cfg: Any
  train: bool = False

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, mask_Bx1xLxS, cache):
    cfg = self.cfg
    mla = cfg.mla
    n, c, p, u, r = (cfg.n_head, mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim,
                     mla.kv_lora_rank)
    b, l, _ = x_BxLxD.shape
    if mla.q_lora_rank:
      q_BxLxQ = _latent_norm(cfg, 'q_a_norm')(dense(cfg, mla.q_lora_rank, 'q_a')(x_BxLxD))
      q_BxLxNxCP = dense(cfg, n * (c + p), 'q_b', bias=False)(q_BxLxQ).reshape(b, l, n, c + p)
    else:
      q_BxLxNxCP = dense(cfg, n * (c + p), 'q', bias=False)(x_BxLxD).reshape(b, l, n, c + p)
    q_nope_BxLxNxC = q_BxLxNxCP[..., :c]
    q_rope_BxLxNxP = rope(q_BxLxNxCP[..., c:], positions_BxL, cfg.rope_theta)
    kv_BxLxRP = dense(cfg, r + p, 'kv_a')(x_BxLxD)
    c_BxLxR = _latent_norm(cfg, 'kv_a_norm')(kv_BxLxRP[..., :r])
    k_rope_BxLxP = rope(kv_BxLxRP[..., None, r:], positions_BxL, cfg.rope_theta)[:, :, 0]
    w_kv_RxNxCU = _Kernel((r, n * (c + u)), name='kv_b')().astype(cfg.dtype).reshape(r, n, c + u)
    scale = (c + p) ** -0.5

    if cache is None:   # training / a full forward pass: expand the latent into K and V
      kv_BxLxNxCU = jnp.einsum('blr,rnh->blnh', c_BxLxR, w_kv_RxNxCU)
      k_BxLxNxCP = jnp.concatenate(
          [kv_BxLxNxCU[..., :c], jnp.broadcast_to(k_rope_BxLxP[:, :, None], (b, l, n, p))], -1)
      q_BxLxNxCP = jnp.concatenate([q_nope_BxLxNxC, q_rope_BxLxNxP], -1)
      y_BxLxNxU = _attend(cfg, q_BxLxNxCP, k_BxLxNxCP, kv_BxLxNxCU[..., c:], mask_Bx1xLxS, scale)
      new_cache = None
    else:   # decoding over the latent cache, W_kv_b absorbed
      new_cache = dict(c=_write(cache, 'c', c_BxLxR), k_rope=_write(cache, 'k_rope', k_rope_BxLxP),
                       index=cache['index'] + l)
      c_BxSxR = new_cache['c'].astype(cfg.dtype)
      q_lat_BxLxNxR = jnp.einsum('blnc,rnc->blnr', q_nope_BxLxNxC, w_kv_RxNxCU[..., :c])
      scores_BxNxLxS = (
          jnp.einsum('blnr,bsr->bnls', q_lat_BxLxNxR, c_BxSxR, preferred_element_type=jnp.float32)
          + jnp.einsum('blnp,bsp->bnls', q_rope_BxLxNxP, new_cache['k_rope'].astype(cfg.dtype),
                       preferred_element_type=jnp.float32)) * scale
      scores_BxNxLxS = jnp.where(mask_Bx1xLxS, scores_BxNxLxS, jnp.finfo(jnp.float32).min)
      probs_BxNxLxS = jax.nn.softmax(scores_BxNxLxS, axis=-1).astype(cfg.dtype)
      y_lat_BxLxNxR = jnp.einsum('bnls,bsr->blnr', probs_BxNxLxS, c_BxSxR)
      y_BxLxNxU = jnp.einsum('blnr,rnu->blnu', y_lat_BxLxNxR, w_kv_RxNxCU[..., c:])
    y_BxLxD = dense(cfg, cfg.d_model, 'o', std=residual_std(cfg))(y_BxLxNxU.reshape(b, l, n * u))
    return nn.Dropout(cfg.dropout, deterministic=not self.train)(y_BxLxD), new_cache


def layer(cfg, train: bool, name: str):
  """The attention layer `cfg.attention_kind` names."""
  return (MLA if cfg.attention_kind == 'mla' else Attention)(cfg, train, name=name)


def cache_shapes(cfg) -> dict[str, tuple[int, ...]]:
  """A layer's cache entries and the shape one token takes in each."""
  if cfg.attention_kind == 'mla':
    return dict(c=(cfg.mla.kv_lora_rank,), k_rope=(cfg.mla.qk_rope_head_dim,))
  return dict(k=(cfg.n_kv_head, cfg.head_dim), v=(cfg.n_kv_head, cfg.head_dim))


def cache_bytes_per_token(cfg, dtype=jnp.float32) -> int:
  """Bytes the KV cache holds per token over all layers."""
  per_layer = sum(math.prod(s) for s in cache_shapes(cfg).values())
  return cfg.n_layer * per_layer * jnp.dtype(dtype).itemsize


def init_cache(cfg, batch: int, size: int, dtype=jnp.float32) -> list[dict]:
  """An empty cache of `size` slots per layer: arrays [batch, ..., size, W] and 'index' 0."""
  return [dict({k: jnp.zeros((batch, *s[:-1], size, s[-1]), dtype)
                for k, s in cache_shapes(cfg).items()},
               index=jnp.int32(0)) for _ in range(cfg.n_layer)]
