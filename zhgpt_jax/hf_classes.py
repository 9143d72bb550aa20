"""One entry per HuggingFace transformers class our models export to and import from.

Each of our variants maps onto a stock class, so an export loads with
`AutoModelForCausalLM.from_pretrained(dir)` and no custom code:

  GPT-2 (learned positions, GELU, LayerNorm, biases)  -> GPT2LMHeadModel
  Llama-style (RoPE, SwiGLU, RMSNorm; GQA; biases optional) -> LlamaForCausalLM
  the same with q/k/v biases only (model.qkv_bias)    -> Qwen2ForCausalLM
  the same, no biases, with QK-norm (model.qk_norm)   -> Qwen3ForCausalLM
  MoE (RoPE, RMSNorm, softmax-gated SwiGLU experts)   -> Qwen2MoeForCausalLM
    (sparse or dense dispatch alike; first dense layers as mlp_only_layers)

An `HFClass` entry says what the class needs of a GPTConfig (`needs`, `check`), how our config
becomes the class's config.json fields and back (`to_config`, `from_config`), and which tensors
map one to one (`rows`: HF name, our path, to HF, from HF; used in both directions), plus hooks
for the tensors that are not one-to-one (`to_tensors`, `from_tensors`: GPT-2's fused q|k|v,
per-expert matrices, Qwen2-MoE's fixed extras). export.py holds the files and entry points and
never names a class.

Adding a class (e.g. DeepseekV3ForCausalLM): write its functions here (reuse `_llama_*` where
the layout is Llama's), add `register(HFClass(...))` (the order is the order of preference: the
first class whose needs a model meets is the one it exports to), and a round-trip case in
tests/test_export.py. A model field the class carries that HF has no field for rides along in
config.json's "zhgpt_jax" block by itself.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from zhgpt_jax.config import UserError
from zhgpt_jax.gpt_config import GPTConfig

Row = tuple[str, str, Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]


class Checkpoint:
  """An HF checkpoint's tensors as an import reads them: what no row or hook takes is
  refused at the end (a structure we do not model)."""

  def __init__(self, tensors: dict[str, np.ndarray], arch: str):
    self.tensors, self.arch, self.used = tensors, arch, set()

  def has(self, name: str) -> bool:
    return name in self.tensors

  def take(self, name: str) -> np.ndarray:
    if name not in self.tensors:
      raise UserError(f'checkpoint lacks tensor {name} that {self.arch} needs')
    self.used.add(name)
    return self.tensors[name]

  def zero(self, name: str) -> None:
    """Takes `name` if present; UserError unless it is all zeros."""
    if name in self.tensors and np.any(self.take(name)):
      raise UserError(f'{name} is not zero: our model has no counterpart for it')

  def unused(self, ignorable: tuple[str, ...]) -> list[str]:
    return [k for k in self.tensors if k not in self.used and not k.endswith(ignorable)]


@dataclasses.dataclass(frozen=True)
class HFClass:
  name: str                                   # the transformers class ("architectures")
  model_type: str                             # config.json "model_type"
  needs: dict                                 # GPTConfig path -> the value the class needs
  to_config: Callable[[GPTConfig], dict]      # the class's own config.json fields
  # (config.json, its "zhgpt_jax" block flattened) -> {GPTConfig path: value}; UserError if
  # the config has no counterpart in our model
  from_config: Callable[[dict, dict], dict]
  rows: Callable[[GPTConfig], list[Row]]      # the one-to-one tensors
  to_tensors: Callable[[GPTConfig, dict, dict], None] | None = None   # (cfg, flat, out)
  from_tensors: Callable[[GPTConfig, Checkpoint, dict], None] | None = None   # (cfg, ckpt, flat)
  # (cfg, our param shapes) -> the shapes of the tensors `to_tensors` writes (and the other
  # layouts `from_tensors` reads), for checking a directory without loading it
  shapes: Callable[[GPTConfig, dict], dict] | None = None
  check: Callable[[GPTConfig], dict] | None = None   # further needs: {path: needed} it misses
  why: dict = dataclasses.field(default_factory=dict)  # path -> why the class needs it
  prefix: str = 'model.'                      # tensor prefix a bare base-model checkpoint lacks
  tied_by_default: bool = False               # tie_word_embeddings when config.json omits it


CLASSES: dict[str, HFClass] = {}


def register(entry: HFClass) -> HFClass:
  CLASSES[entry.name] = entry
  return entry


def by_name(c: dict) -> HFClass:
  """The entry of an HF config dict ("architectures", else "model_type"); UserError if none."""
  types = {e.model_type: e.name for e in CLASSES.values()}
  arch = (c.get('architectures') or [types.get(c.get('model_type'), '')])[0]
  if arch not in CLASSES:
    raise UserError(f'cannot import architecture {arch or "(none)"!r}: supported are '
                    f'{", ".join(CLASSES)}')
  return CLASSES[arch]


def _same(w):
  return w


def _t(w):
  return np.ascontiguousarray(w.T)   # Dense kernels are [in, out]; torch Linear is [out, in]


# ---------------------------------------------------------------------------------------------
# GPT-2.

def _gpt2_config(cfg: GPTConfig) -> dict:
  return dict(model_type='gpt2', n_embd=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head,
              n_inner=cfg.mlp_hidden, n_positions=cfg.seq_len, n_ctx=cfg.seq_len,
              activation_function='gelu_new',
              layer_norm_epsilon=cfg.norm_eps, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
              attn_pdrop=0.0, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
              reorder_and_upcast_attn=False)


def _gpt2_from_config(c: dict, ours: dict) -> dict:
  act = c.get('activation_function', 'gelu_new')
  if act not in ('gelu_new', 'gelu_pytorch_tanh') or c.get('scale_attn_by_inverse_layer_idx') \
      or c.get('add_cross_attention') or not c.get('scale_attn_weights', True):
    raise UserError(f'GPT-2 variant (activation_function={act!r}, scaled attention flags) '
                    'has no counterpart in our model')
  d = c['n_embd']
  return dict(d_model=d, n_layer=c['n_layer'], n_head=c['n_head'], n_kv_head=c['n_head'],
              mlp_hidden=c.get('n_inner') or 4 * d, seq_len=c['n_positions'], bias=True,
              position='learned', mlp='gelu', norm='layernorm',
              norm_eps=c.get('layer_norm_epsilon', 1e-5))


def _gpt2_rows(cfg: GPTConfig) -> list[Row]:
  rows = [('transformer.wte.weight', 'wte/embedding', _same, _same),
          ('transformer.wpe.weight', 'wpe/embedding', _same, _same),
          ('transformer.ln_f.weight', 'ln_f/scale', _same, _same),
          ('transformer.ln_f.bias', 'ln_f/bias', _same, _same)]
  for i in range(cfg.n_layer):
    hf, us = f'transformer.h.{i}.', f'h_{i}/'
    # Conv1D stores [in, out] like a Dense kernel: no transposes in GPT-2.
    for hf_name, ours in (('ln_1.weight', 'ln_1/scale'), ('ln_1.bias', 'ln_1/bias'),
                          ('ln_2.weight', 'ln_2/scale'), ('ln_2.bias', 'ln_2/bias'),
                          ('attn.c_proj.weight', 'attn/o/kernel'),
                          ('attn.c_proj.bias', 'attn/o/bias'),
                          ('mlp.c_fc.weight', 'mlp/fc/kernel'), ('mlp.c_fc.bias', 'mlp/fc/bias'),
                          ('mlp.c_proj.weight', 'mlp/proj/kernel'),
                          ('mlp.c_proj.bias', 'mlp/proj/bias')):
      rows.append((hf + hf_name, us + ours, _same, _same))
  if not cfg.tie_embeddings:
    rows.append(('lm_head.weight', 'lm_head', _t, _t))
  return rows


def _gpt2_to_tensors(cfg: GPTConfig, flat: dict, out: dict) -> None:
  for i in range(cfg.n_layer):   # q, k and v as one fused c_attn
    a = f'h_{i}/attn/'
    out[f'transformer.h.{i}.attn.c_attn.weight'] = np.concatenate(
        [flat[a + x + '/kernel'] for x in 'qkv'], axis=1)
    out[f'transformer.h.{i}.attn.c_attn.bias'] = np.concatenate(
        [flat[a + x + '/bias'] for x in 'qkv'])


def _gpt2_from_tensors(cfg: GPTConfig, t: Checkpoint, flat: dict) -> None:
  for i in range(cfg.n_layer):
    hf, a = f'transformer.h.{i}.attn.', f'h_{i}/attn/'
    ws = np.split(t.take(hf + 'c_attn.weight'), 3, axis=1)
    bs = np.split(t.take(hf + 'c_attn.bias'), 3)
    for x, w, b in zip('qkv', ws, bs):
      flat[a + x + '/kernel'], flat[a + x + '/bias'] = np.ascontiguousarray(w), b


def _gpt2_shapes(cfg: GPTConfig, ours: dict) -> dict:
  out = {}
  for i in range(cfg.n_layer):
    width = sum(ours[f'h_{i}/attn/{x}/kernel'][1] for x in 'qkv')
    out[f'transformer.h.{i}.attn.c_attn.weight'] = (cfg.d_model, width)
    out[f'transformer.h.{i}.attn.c_attn.bias'] = (width,)
  return out


register(HFClass(
    'GPT2LMHeadModel', 'gpt2', dict(position='learned', mlp='gelu', norm='layernorm', bias=True),
    _gpt2_config, _gpt2_from_config, _gpt2_rows, _gpt2_to_tensors, _gpt2_from_tensors,
    _gpt2_shapes,
    # GPT-2 has no grouped-query attention
    check=lambda cfg: {} if cfg.n_kv_head == cfg.n_head else {'n_kv_head': cfg.n_head},
    prefix='transformer.', tied_by_default=True))


# ---------------------------------------------------------------------------------------------
# The Llama layout: Llama, Qwen2, Qwen2-MoE.

def _llama_config(cfg: GPTConfig) -> dict:
  # rope_theta top-level is what transformers 4.x reads, rope_parameters what 5.x reads.
  return dict(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
              num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
              head_dim=cfg.head_dim, intermediate_size=cfg.mlp_hidden, hidden_act='silu',
              max_position_embeddings=cfg.seq_len, rms_norm_eps=cfg.norm_eps,
              rope_theta=cfg.rope_theta,
              rope_parameters=dict(rope_type='default', rope_theta=cfg.rope_theta),
              attention_dropout=0.0)


def _rope_theta(c: dict) -> float:
  rope = c.get('rope_parameters') or c.get('rope_scaling') or {}
  if rope.get('rope_type', rope.get('type', 'default')) != 'default':
    raise UserError(f'rope scaling {rope!r} has no counterpart in our model')
  return float(rope.get('rope_theta', c.get('rope_theta', 10000.0)))


def _llama_from_config(c: dict) -> dict:
  d, n = c['hidden_size'], c['num_attention_heads']
  if c.get('hidden_act', 'silu') != 'silu' or (c.get('head_dim') or d // n) != d // n:
    raise UserError(f'{c.get("architectures")} with hidden_act={c.get("hidden_act")!r}, '
                    f'head_dim={c.get("head_dim")} has no counterpart in our model')
  return dict(d_model=d, n_layer=c['num_hidden_layers'], n_head=n,
              n_kv_head=c.get('num_key_value_heads') or n, mlp_hidden=c['intermediate_size'],
              seq_len=c['max_position_embeddings'], position='rope', rope_theta=_rope_theta(c),
              norm='rmsnorm', norm_eps=c.get('rms_norm_eps', 1e-6))


def _llama_attention_rows(cfg: GPTConfig, i: int) -> list[Row]:
  hf, us = f'model.layers.{i}.', f'h_{i}/'
  rows = [(hf + 'input_layernorm.weight', us + 'ln_1/scale', _same, _same),
          (hf + 'post_attention_layernorm.weight', us + 'ln_2/scale', _same, _same)]
  for x in 'qkvo':
    rows.append((f'{hf}self_attn.{x}_proj.weight', f'{us}attn/{x}/kernel', _t, _t))
    if cfg.bias or (cfg.qkv_bias and x != 'o'):
      rows.append((f'{hf}self_attn.{x}_proj.bias', f'{us}attn/{x}/bias', _same, _same))
  return rows


def _llama_mlp_rows(cfg: GPTConfig, i: int) -> list[Row]:
  hf, us = f'model.layers.{i}.', f'h_{i}/'
  rows = []
  for x in ('gate', 'up', 'down'):
    rows.append((f'{hf}mlp.{x}_proj.weight', f'{us}mlp/{x}/kernel', _t, _t))
    if cfg.bias:
      rows.append((f'{hf}mlp.{x}_proj.bias', f'{us}mlp/{x}/bias', _same, _same))
  return rows


def llama_layout_rows(cfg: GPTConfig, attention_rows, moe_rows) -> list[Row]:
  """The Llama layout's one-to-one tensors: embeddings, final norm, untied head, and per
  layer `attention_rows(cfg, i)`, then `moe_rows(cfg, i)` (an MoE layer) or the dense SwiGLU."""
  rows = [('model.embed_tokens.weight', 'wte/embedding', _same, _same),
          ('model.norm.weight', 'ln_f/scale', _same, _same)]
  if not cfg.tie_embeddings:
    rows.append(('lm_head.weight', 'lm_head', _t, _t))
  for i in range(cfg.n_layer):
    rows += attention_rows(cfg, i)
    rows += moe_rows(cfg, i) if cfg.is_moe_layer(i) else _llama_mlp_rows(cfg, i)
  return rows


def _llama_rows(cfg: GPTConfig) -> list[Row]:
  return llama_layout_rows(cfg, _llama_attention_rows, _qwen2_moe_rows)


def _llama_from(c: dict, ours: dict) -> dict:
  if c.get('attention_bias', False) != c.get('mlp_bias', False):
    raise UserError('attention_bias != mlp_bias: our model has one bias switch for both')
  return dict(_llama_from_config(c), mlp='swiglu', bias=c.get('attention_bias', False))


register(HFClass(
    'LlamaForCausalLM', 'llama', dict(position='rope', mlp='swiglu', norm='rmsnorm',
                                      qkv_bias=False),
    lambda cfg: dict(_llama_config(cfg), model_type='llama', attention_bias=cfg.bias,
                     mlp_bias=cfg.bias),
    _llama_from, _llama_rows))


def _qwen2_from(c: dict, ours: dict) -> dict:
  if c.get('use_sliding_window'):
    raise UserError('Qwen2 with use_sliding_window=true has no counterpart in our model')
  return dict(_llama_from_config(c), mlp='swiglu', bias=False, qkv_bias=True)


register(HFClass(
    'Qwen2ForCausalLM', 'qwen2', dict(position='rope', mlp='swiglu', norm='rmsnorm', bias=False,
                                      qkv_bias=True),
    lambda cfg: dict(_llama_config(cfg), model_type='qwen2', use_sliding_window=False,
                     sliding_window=None, max_window_layers=cfg.n_layer,
                     layer_types=['full_attention'] * cfg.n_layer),
    _qwen2_from, _llama_rows))


def _qwen3_from(c: dict, ours: dict) -> dict:
  if c.get('use_sliding_window') or c.get('attention_bias'):
    raise UserError('Qwen3 with use_sliding_window or attention_bias=true has no counterpart '
                    'in our model')
  return dict(_llama_from_config(c), mlp='swiglu', bias=False, qkv_bias=False, qk_norm=True)


def _qwen3_attention_rows(cfg: GPTConfig, i: int) -> list[Row]:
  # q_norm / k_norm: RMSNorm over head_dim, one weight shared by the heads, before RoPE.
  return _llama_attention_rows(cfg, i) + [
      (f'model.layers.{i}.self_attn.{x}_norm.weight', f'h_{i}/attn/{x}_norm/scale', _same, _same)
      for x in 'qk']


register(HFClass(
    'Qwen3ForCausalLM', 'qwen3', dict(position='rope', mlp='swiglu', norm='rmsnorm', bias=False,
                                      qkv_bias=False, qk_norm=True),
    lambda cfg: dict(_llama_config(cfg), model_type='qwen3', attention_bias=False,
                     use_sliding_window=False, sliding_window=None,
                     max_window_layers=cfg.n_layer, layer_types=['full_attention'] * cfg.n_layer),
    _qwen3_from, lambda cfg: llama_layout_rows(cfg, _qwen3_attention_rows, _qwen2_moe_rows)))


# ---------------------------------------------------------------------------------------------
# Qwen2-MoE.

def _sparse_layers(cfg: GPTConfig) -> dict:
  """Qwen2-MoE's choice of MoE layers: every k-th (decoder_sparse_step), less mlp_only_layers."""
  if not cfg.moe.first_dense:
    return dict(decoder_sparse_step=cfg.moe.every, mlp_only_layers=[])
  return dict(decoder_sparse_step=1,
              mlp_only_layers=[i for i in range(cfg.n_layer) if not cfg.is_moe_layer(i)])


def _qwen2_moe_config(cfg: GPTConfig) -> dict:
  # Our softmax gate over all experts, top-k kept without renormalising, is Qwen2-MoE's
  # router with norm_topk_prob=False; every k-th layer MoE is decoder_sparse_step=k.
  return dict(_llama_config(cfg), model_type='qwen2_moe', num_experts=cfg.moe.n_routed,
              num_experts_per_tok=cfg.moe.top_k, moe_intermediate_size=cfg.moe.expert_hidden,
              shared_expert_intermediate_size=cfg.moe.n_shared * cfg.moe.expert_hidden,
              norm_topk_prob=False, **_sparse_layers(cfg), use_sliding_window=False,
              qkv_bias=True)


def _qwen2_moe_from(c: dict, ours: dict) -> dict:
  f, shared = c['moe_intermediate_size'], c.get('shared_expert_intermediate_size', 0)
  # mlp_only_layers we model: the first k layers (moe.first_dense), every layer after MoE.
  dense_first = list(c.get('mlp_only_layers') or [])
  first_dense_ok = dense_first == list(range(len(dense_first))) and \
      (not dense_first or c.get('decoder_sparse_step', 1) == 1)
  if c.get('norm_topk_prob') or not first_dense_ok or c.get('use_sliding_window') or shared % f:
    raise UserError('Qwen2-MoE with norm_topk_prob, mlp_only_layers other than the first '
                    'k, sliding windows or a shared expert width not a multiple of '
                    'moe_intermediate_size has no counterpart in our model')
  # Our own exports say (under "zhgpt_jax") when the q/k/v biases and the shared expert's
  # gate are fixed zeros; a stock Qwen2-MoE has both.
  return {**_llama_from_config(c), 'mlp': 'moe', 'bias': False,
          'qkv_bias': ours.get('qkv_bias', c.get('qkv_bias', True)),
          'moe.n_routed': c['num_experts'], 'moe.top_k': c['num_experts_per_tok'],
          'moe.expert_hidden': f, 'moe.n_shared': shared // f, 'moe.gate': 'softmax',
          'moe.every': c.get('decoder_sparse_step', 1),
          'moe.shared_gate': ours.get('moe.shared_gate', bool(shared)),
          'moe.first_dense': len(dense_first), 'moe.balance': 'aux'}


def _qwen2_moe_rows(cfg: GPTConfig, i: int) -> list[Row]:
  hf, us = f'model.layers.{i}.', f'h_{i}/'
  rows = [(hf + 'mlp.gate.weight', us + 'moe/router/kernel', _t, _t)]
  if cfg.moe.n_shared and cfg.moe.shared_gate:
    rows.append((hf + 'mlp.shared_expert_gate.weight', us + 'moe/shared_gate/kernel', _t, _t))
  if cfg.moe.n_shared:
    # HF scales the shared expert by sigmoid(gate · x). Without a gate of our own we export
    # it as 0, i.e. a fixed 1/2, and double the down projection (exact: a power of two).
    two = np.float32(1 if cfg.moe.shared_gate else 2)
    rows += [(hf + 'mlp.shared_expert.gate_proj.weight', us + 'moe/shared/gate/kernel', _t, _t),
             (hf + 'mlp.shared_expert.up_proj.weight', us + 'moe/shared/up/kernel', _t, _t),
             (hf + 'mlp.shared_expert.down_proj.weight', us + 'moe/shared/down/kernel',
              lambda w: _t(w) * two, lambda w: _t(w) / two)]
  return rows


def _qwen2_moe_to_tensors(cfg: GPTConfig, flat: dict, out: dict) -> None:
  d = cfg.d_model
  for i in range(cfg.n_layer):
    hf, m = f'model.layers.{i}.', f'h_{i}/moe/'
    # Qwen2-MoE attention always has q/k/v biases in transformers 4.x: zeros are exact.
    for x, width in (('q', cfg.n_head), ('k', cfg.n_kv_head), ('v', cfg.n_kv_head)):
      if not cfg.qkv_bias:
        out[f'{hf}self_attn.{x}_proj.bias'] = np.zeros(width * cfg.head_dim, np.float32)
    if not cfg.is_moe_layer(i):
      continue
    if not (cfg.moe.n_shared and cfg.moe.shared_gate):
      out[hf + 'mlp.shared_expert_gate.weight'] = np.zeros((1, d), np.float32)
    experts_to_tensors(cfg, flat, out, hf + 'mlp.', m, 'shared_expert')


def experts_to_tensors(cfg: GPTConfig, flat: dict, out: dict, hf: str, m: str,
                       shared: str) -> None:
  """An MoE layer's routed experts (our [E, ...] stacks under `m`) as per-expert tensors under
  `hf` (the layout `save_pretrained` writes and every version reads) and, with no shared
  experts, a zero-width shared MLP `hf + shared` (HF always builds one)."""
  d = cfg.d_model
  if not cfg.moe.n_shared:
    for x, shape in (('gate', (0, d)), ('up', (0, d)), ('down', (d, 0))):
      out[f'{hf}{shared}.{x}_proj.weight'] = np.zeros(shape, np.float32)
  for j in range(cfg.moe.n_routed):
    for x in ('gate', 'up', 'down'):
      out[f'{hf}experts.{j}.{x}_proj.weight'] = _t(flat[f'{m}w_{x}'][j])


def _qwen2_moe_from_tensors(cfg: GPTConfig, t: Checkpoint, flat: dict) -> None:
  for i in range(cfg.n_layer):
    hf, m = f'model.layers.{i}.', f'h_{i}/moe/'
    for x in 'qkv' if not cfg.qkv_bias else '':
      t.zero(f'{hf}self_attn.{x}_proj.bias')
    if not cfg.is_moe_layer(i):
      continue
    if not (cfg.moe.n_shared and cfg.moe.shared_gate):
      t.take(hf + 'mlp.shared_expert_gate.weight')
      t.zero(hf + 'mlp.shared_expert_gate.weight')
    if not cfg.moe.n_shared:
      for x in ('gate', 'up', 'down'):
        t.zero(f'{hf}mlp.shared_expert.{x}_proj.weight')
    fused = hf + 'mlp.experts.gate_up_proj'
    if t.has(fused):   # transformers 5 `save_original_format=False`: [E, 2F, D] and [E, D, F]
      gate, up = np.split(t.take(fused), 2, axis=1)
      flat[m + 'w_gate'] = np.ascontiguousarray(gate.transpose(0, 2, 1))
      flat[m + 'w_up'] = np.ascontiguousarray(up.transpose(0, 2, 1))
      flat[m + 'w_down'] = np.ascontiguousarray(
          t.take(hf + 'mlp.experts.down_proj').transpose(0, 2, 1))
    else:
      for x in ('gate', 'up', 'down'):
        flat[m + 'w_' + x] = np.stack(
            [_t(t.take(f'{hf}mlp.experts.{j}.{x}_proj.weight')) for j in range(cfg.moe.n_routed)])


def _qwen2_moe_shapes(cfg: GPTConfig, ours: dict) -> dict:
  out = {}
  for i in cfg.moe_layers():   # per-expert tensors, and transformers 5's fused layout
    hf, m = f'model.layers.{i}.mlp.experts.', f'h_{i}/moe/'
    e, d, f = ours[m + 'w_gate']
    out.update({hf + 'gate_up_proj': (e, 2 * f, d), hf + 'down_proj': (e, d, f)})
    out.update({f'{hf}{j}.{x}_proj.weight': ours[f'{m}w_{x}'][1:][::-1]
                for j in range(e) for x in ('gate', 'up', 'down')})
  return out


register(HFClass(
    'Qwen2MoeForCausalLM', 'qwen2_moe',
    {'position': 'rope', 'mlp': 'moe', 'norm': 'rmsnorm', 'bias': False, 'moe.gate': 'softmax',
     'moe.balance': 'aux'},
    _qwen2_moe_config, _qwen2_moe_from, _llama_rows, _qwen2_moe_to_tensors,
    _qwen2_moe_from_tensors, _qwen2_moe_shapes,
    why={'moe.balance': 'Qwen2-MoE has no per-expert routing bias (it only moves the top-k '
                        'choice, but that changes which experts run)'}))
