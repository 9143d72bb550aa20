"""HuggingFace classes of the DeepSeek-V3 layout, registered into `hf_classes.CLASSES`:

  MLA (attention_kind='mla'), SwiGLU or the sigmoid MoE  -> DeepseekV3ForCausalLM
  standard attention with the same sigmoid MoE          -> Glm4MoeForCausalLM

Both route as transformers' DeepseekV3TopkRouter: sigmoid scores, `e_score_correction_bias`
(our moe/expert_bias of balance='bias'; zeros when we balance with the aux loss) for the
choice only, group-limited top-k (n_group / topk_group), the chosen gates renormalised
(norm_topk_prob) and scaled (routed_scaling_factor). Every layer from first_k_dense_replace on
is MoE (a dense MLA model: first_k_dense_replace = num_hidden_layers), with n_shared_experts
shared experts as one MLP of n_shared x moe_intermediate_size.

MLA's rotary query/key columns are ours in rotate-half order and DeepSeek's in interleaved
pairs (transformers' rope_interleave=True, which vLLM and llama.cpp assume too): the rows
permute them, both ways, exactly. Multi-token-prediction layers (`model.layers.{n_layer}.*`
of a published checkpoint) are not modelled and are skipped on import.
"""

from __future__ import annotations

import numpy as np

from zhgpt_jax.config import UserError
from zhgpt_jax.gpt_config import GPTConfig, get
from zhgpt_jax.hf_classes import (Checkpoint, HFClass, Row, _llama_attention_rows,
                                  _llama_config, _llama_from_config,
                                  _rope_theta, _same, _t, experts_to_tensors,
                                  llama_layout_rows, register)


def _rope_order(p: int) -> np.ndarray:
  """Our rotate-half rotary columns, in DeepSeek's interleaved (pairwise) order: ours[..., t]
  is theirs[..., order[t]]. transformers' rope_interleave=True de-interleaves, then rotates
  halves, so the two layouts compute the same scores."""
  return np.concatenate([np.arange(0, p, 2), np.arange(1, p, 2)])


def _rope_cols(heads: int, keep: int, p: int, to_hf: bool):
  """A (to HF | from HF) row function for a Dense kernel [in, heads·(keep + p)] whose columns
  are, per head, `keep` no-position columns then `p` rotary ones."""
  order = _rope_order(p)
  perm = np.concatenate([np.arange(keep), keep + (np.argsort(order) if to_hf else order)])

  def ours_to_hf(w):   # ours [in, out] -> theirs [out, in]
    x = w.reshape(w.shape[0], heads, keep + p)[..., perm]
    return _t(x.reshape(w.shape[0], -1))

  def hf_to_ours(w):   # theirs [out, in] -> ours [in, out]
    x = _t(w)
    return np.ascontiguousarray(x.reshape(x.shape[0], heads, keep + p)[..., perm].reshape(
        x.shape[0], -1))
  return ours_to_hf if to_hf else hf_to_ours


def _router_config(cfg: GPTConfig) -> dict:
  m = cfg.moe
  return dict(n_routed_experts=m.n_routed, n_shared_experts=m.n_shared,
              num_experts_per_tok=m.top_k, moe_intermediate_size=m.expert_hidden,
              routed_scaling_factor=m.routed_scale, n_group=m.n_group, topk_group=m.topk_group,
              norm_topk_prob=m.norm_topk,
              first_k_dense_replace=m.first_dense if cfg.mlp == 'moe' else cfg.n_layer,
              num_nextn_predict_layers=0)


def _router_from(c: dict, ours: dict, n_layer: int) -> dict:
  """Our MLP/MoE fields from a DeepseekV3 / Glm4-MoE config (every layer dense: mlp=swiglu)."""
  if c.get('hidden_act', 'silu') != 'silu':
    raise UserError(f'hidden_act={c.get("hidden_act")!r} has no counterpart in our model')
  first = c.get('first_k_dense_replace', 0) or 0
  if first >= n_layer:
    return {'mlp': 'swiglu'}
  out = {'mlp': 'moe', 'moe.gate': 'sigmoid', 'moe.every': 1, 'moe.first_dense': first,
         'moe.n_routed': c['n_routed_experts'], 'moe.n_shared': c.get('n_shared_experts') or 0,
         'moe.top_k': c['num_experts_per_tok'], 'moe.expert_hidden': c['moe_intermediate_size'],
         'moe.routed_scale': float(c.get('routed_scaling_factor', 1.0)),
         'moe.n_group': c.get('n_group') or 1, 'moe.topk_group': c.get('topk_group') or 1,
         'moe.norm_topk': bool(c.get('norm_topk_prob', True)), 'moe.shared_gate': False,
         # A stock checkpoint carries the correction bias it was trained with; our own
         # exports of an aux-balanced model say so under "zhgpt_jax" (its bias is zeros).
         'moe.balance': ours.get('moe.balance', 'bias')}
  return out


def _router_rows(cfg: GPTConfig, i: int) -> list[Row]:
  hf, us = f'model.layers.{i}.mlp.', f'h_{i}/moe/'
  rows = [(hf + 'gate.weight', us + 'router/kernel', _t, _t)]
  if cfg.moe.balance == 'bias':
    rows.append((hf + 'gate.e_score_correction_bias', us + 'expert_bias', _same, _same))
  if cfg.moe.n_shared:
    rows += [(f'{hf}shared_experts.{x}_proj.weight', f'{us}shared/{x}/kernel', _t, _t)
             for x in ('gate', 'up', 'down')]
  return rows


def _router_to_tensors(cfg: GPTConfig, flat: dict, out: dict) -> None:
  for i in cfg.moe_layers():
    hf, m = f'model.layers.{i}.mlp.', f'h_{i}/moe/'
    if cfg.moe.balance != 'bias':
      out[hf + 'gate.e_score_correction_bias'] = np.zeros(cfg.moe.n_routed, np.float32)
    experts_to_tensors(cfg, flat, out, hf, m, 'shared_experts')


def _experts_from(cfg: GPTConfig, t: Checkpoint, flat: dict, hf: str, m: str) -> None:
  """The routed experts of one layer, per-expert tensors or transformers 5's fused layout."""
  fused = hf + 'experts.gate_up_proj'
  if t.has(fused):   # [E, 2F, D] and [E, D, F]
    gate, up = np.split(t.take(fused), 2, axis=1)
    flat[m + 'w_gate'] = np.ascontiguousarray(gate.transpose(0, 2, 1))
    flat[m + 'w_up'] = np.ascontiguousarray(up.transpose(0, 2, 1))
    flat[m + 'w_down'] = np.ascontiguousarray(t.take(hf + 'experts.down_proj').transpose(0, 2, 1))
  else:
    for x in ('gate', 'up', 'down'):
      flat[m + 'w_' + x] = np.stack(
          [_t(t.take(f'{hf}experts.{j}.{x}_proj.weight')) for j in range(cfg.moe.n_routed)])


def _router_from_tensors(cfg: GPTConfig, t: Checkpoint, flat: dict) -> None:
  for name in list(t.tensors):   # multi-token-prediction layers follow the last one: skipped
    parts = name.split('.')
    if parts[:2] == ['model', 'layers'] and int(parts[2]) >= cfg.n_layer:
      t.take(name)
  for i in cfg.moe_layers():
    hf, m = f'model.layers.{i}.mlp.', f'h_{i}/moe/'
    if cfg.moe.balance != 'bias':
      t.zero(hf + 'gate.e_score_correction_bias')
    if not cfg.moe.n_shared:
      for x in ('gate', 'up', 'down'):
        t.zero(f'{hf}shared_experts.{x}_proj.weight')
    _experts_from(cfg, t, flat, hf, m)


def _deepseek_rows(cfg: GPTConfig, attention_rows) -> list[Row]:
  return llama_layout_rows(cfg, attention_rows, _router_rows)


def _mla_rows(cfg: GPTConfig, i: int) -> list[Row]:
  hf, us = f'model.layers.{i}.', f'h_{i}/'
  a, n = hf + 'self_attn.', cfg.n_head
  c, p, r = cfg.mla.qk_nope_head_dim, cfg.mla.qk_rope_head_dim, cfg.mla.kv_lora_rank
  q = (_rope_cols(n, c, p, True), _rope_cols(n, c, p, False))
  rows = [(hf + 'input_layernorm.weight', us + 'ln_1/scale', _same, _same),
          (hf + 'post_attention_layernorm.weight', us + 'ln_2/scale', _same, _same),
          (a + 'kv_a_proj_with_mqa.weight', us + 'attn/kv_a/kernel',
           _rope_cols(1, r, p, True), _rope_cols(1, r, p, False)),
          (a + 'kv_a_layernorm.weight', us + 'attn/kv_a_norm/scale', _same, _same),
          (a + 'kv_b_proj.weight', us + 'attn/kv_b/kernel', _t, _t),
          (a + 'o_proj.weight', us + 'attn/o/kernel', _t, _t)]
  if cfg.mla.q_lora_rank:
    rows += [(a + 'q_a_proj.weight', us + 'attn/q_a/kernel', _t, _t),
             (a + 'q_a_layernorm.weight', us + 'attn/q_a_norm/scale', _same, _same),
             (a + 'q_b_proj.weight', us + 'attn/q_b/kernel', *q)]
  else:
    rows.append((a + 'q_proj.weight', us + 'attn/q/kernel', *q))
  return rows


def _deepseek_config(cfg: GPTConfig) -> dict:
  mla = cfg.mla
  return dict(
      model_type='deepseek_v3', hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
      num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
      intermediate_size=cfg.mlp_hidden, hidden_act='silu', max_position_embeddings=cfg.seq_len,
      rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
      rope_parameters=dict(rope_type='default', rope_theta=cfg.rope_theta),
      rope_interleave=True, attention_bias=False, attention_dropout=0.0,
      q_lora_rank=mla.q_lora_rank or None, kv_lora_rank=mla.kv_lora_rank,
      qk_nope_head_dim=mla.qk_nope_head_dim, qk_rope_head_dim=mla.qk_rope_head_dim,
      v_head_dim=mla.v_head_dim, **_router_config(cfg))


def _deepseek_from(c: dict, ours: dict) -> dict:
  if c.get('attention_bias') or c.get('rope_interleave', True) is False:
    raise UserError('DeepseekV3 with attention_bias=true or rope_interleave=false has no '
                    'counterpart in our model')
  n, layers = c['num_attention_heads'], c['num_hidden_layers']
  return {'d_model': c['hidden_size'], 'n_layer': layers, 'n_head': n, 'n_kv_head': n,
          'mlp_hidden': c['intermediate_size'], 'seq_len': c['max_position_embeddings'],
          'position': 'rope', 'rope_theta': _rope_theta(c), 'norm': 'rmsnorm',
          'norm_eps': c.get('rms_norm_eps', 1e-6), 'bias': False, 'qkv_bias': False,
          'attention_kind': 'mla', 'mla.q_lora_rank': c.get('q_lora_rank') or 0,
          'mla.kv_lora_rank': c['kv_lora_rank'], 'mla.qk_nope_head_dim': c['qk_nope_head_dim'],
          'mla.qk_rope_head_dim': c['qk_rope_head_dim'], 'mla.v_head_dim': c['v_head_dim'],
          **_router_from(c, ours, layers)}


def _deepseek_style_check(cfg: GPTConfig) -> dict:
  """What DeepseekV3 / Glm4-MoE need beyond `needs`: a SwiGLU MLP or the MoE their router
  runs (sigmoid gate, every layer after the first dense ones, no shared-expert gate)."""
  miss = {}
  if cfg.mlp not in ('swiglu', 'moe'):
    miss['mlp'] = 'moe'
  if cfg.mlp == 'moe':
    for path, need in (('moe.gate', 'sigmoid'), ('moe.every', 1), ('moe.shared_gate', False)):
      if get(cfg, path) != need:
        miss[path] = need
  return miss


register(HFClass(
    'DeepseekV3ForCausalLM', 'deepseek_v3',
    {'attention_kind': 'mla', 'position': 'rope', 'norm': 'rmsnorm', 'bias': False},
    _deepseek_config, _deepseek_from, lambda cfg: _deepseek_rows(cfg, _mla_rows),
    _router_to_tensors, _router_from_tensors, check=_deepseek_style_check,
    why={'moe.gate': "DeepSeek-V3's router is sigmoid only"}))


def _glm4_moe_config(cfg: GPTConfig) -> dict:
  rope = dict(rope_type='default', rope_theta=cfg.rope_theta, partial_rotary_factor=1.0)
  return dict(_llama_config(cfg), model_type='glm4_moe', rope_parameters=rope,
              partial_rotary_factor=1.0, use_qk_norm=False, attention_bias=cfg.qkv_bias,
              **_router_config(cfg))


def _glm4_moe_from(c: dict, ours: dict) -> dict:
  rope = c.get('rope_parameters') or {}
  partial = rope.get('partial_rotary_factor', c.get('partial_rotary_factor', 0.5))
  if partial != 1.0 or c.get('use_qk_norm'):
    raise UserError(f'Glm4-MoE with partial_rotary_factor={partial} or use_qk_norm=true has '
                    'no counterpart in our model')
  return {**_llama_from_config(c), 'bias': False, 'qkv_bias': bool(c.get('attention_bias')),
          **_router_from(c, ours, c['num_hidden_layers'])}


def _glm4_attention_rows(cfg: GPTConfig, i: int) -> list[Row]:
  return _llama_attention_rows(cfg, i)   # q/k/v biases = attention_bias, o without


register(HFClass(
    'Glm4MoeForCausalLM', 'glm4_moe',
    {'attention_kind': 'mha', 'position': 'rope', 'norm': 'rmsnorm', 'bias': False,
     'mlp': 'moe'},
    _glm4_moe_config, _glm4_moe_from, lambda cfg: _deepseek_rows(cfg, _glm4_attention_rows),
    _router_to_tensors, _router_from_tensors, check=_deepseek_style_check,
    why={'moe.gate': "Glm4-MoE's router is sigmoid only"}))
