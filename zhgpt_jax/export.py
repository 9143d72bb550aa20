"""Export to, and import from, HuggingFace transformers directories.

Each of our variants maps onto a stock transformers class, so the export loads with
`AutoModelForCausalLM.from_pretrained(dir)` and no custom code:

  GPT-2 (learned positions, GELU, LayerNorm, biases)  -> GPT2LMHeadModel
  Llama-style (RoPE, SwiGLU, RMSNorm; GQA; biases optional) -> LlamaForCausalLM
  the same with q/k/v biases only (model.qkv_bias)    -> Qwen2ForCausalLM
  MoE (RoPE, RMSNorm, softmax-gated SwiGLU experts)   -> Qwen2MoeForCausalLM
    (sparse or dense dispatch alike; first dense layers as mlp_only_layers)

Anything else (e.g. RoPE with GELU, a sigmoid MoE gate, the moe.balance=bias routing bias) is
refused with the fields at fault.

The mapping of tensors is a table of (HF name, our path, to HF, from HF) rows, used in both
directions, plus the few tensors that are not one-to-one (GPT-2's fused q|k|v, per-expert
matrices, Qwen2-MoE's fixed extras). Fields HF has no place for (real vocab size, dropout,
compute dtype, ...) ride along in config.json under "zhgpt_jax" so a round trip is exact.
Exporting needs no torch (numpy + safetensors); only importing a .bin checkpoint does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Callable

from flax import traverse_util
import jax
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from zhgpt_jax import export_files
from zhgpt_jax import tokenizer as tokenizer_lib
from zhgpt_jax.config import UserError
from zhgpt_jax.model import GPTConfig, effective_attention, init_params

_EXTRA_KEY = 'zhgpt_jax'

# What each class needs of a GPTConfig; the first with no mismatch wins.
_NEEDS = {
    'GPT2LMHeadModel': dict(position='learned', mlp='gelu', norm='layernorm', bias=True),
    'LlamaForCausalLM': dict(position='rope', mlp='swiglu', norm='rmsnorm', qkv_bias=False),
    'Qwen2ForCausalLM': dict(position='rope', mlp='swiglu', norm='rmsnorm', bias=False,
                             qkv_bias=True),
    'Qwen2MoeForCausalLM': dict(position='rope', mlp='moe', norm='rmsnorm', bias=False,
                                moe_gate='softmax'),
}

_BY_TYPE = dict(gpt2='GPT2LMHeadModel', llama='LlamaForCausalLM', qwen2='Qwen2ForCausalLM',
                qwen2_moe='Qwen2MoeForCausalLM')

Row = tuple[str, str, Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]


def _same(w):
  return w


def _t(w):
  return np.ascontiguousarray(w.T)   # Dense kernels are [in, out]; torch Linear is [out, in]


def hf_architecture(cfg: GPTConfig) -> str:
  """The transformers class `cfg` exports to; UserError naming the fields that do not map."""
  if cfg.mlp == 'moe' and cfg.moe_balance == 'bias':
    # The bias only changes which experts are chosen, but it does change them: dropping it
    # would route differently. DeepseekV3's e_score_correction_bias is the same idea, but that
    # class needs MLA attention and group-limited routing, which our model does not have.
    raise UserError('model.moe.balance=bias: Qwen2MoeForCausalLM has no per-expert routing '
                    'bias (it only moves the top-k choice), so no stock class routes as this '
                    'model does; not exported')
  misses = {}
  # With biases everywhere, the q/k/v-only switch changes nothing.
  cfg = dataclasses.replace(cfg, qkv_bias=cfg.qkv_bias and not cfg.bias)
  for arch, needs in _NEEDS.items():
    miss = {k: v for k, v in needs.items() if getattr(cfg, k) != v}
    if arch == 'GPT2LMHeadModel' and cfg.n_kv_head != cfg.n_head:
      miss['n_kv_head'] = cfg.n_head   # GPT-2 has no grouped-query attention
    if not miss:
      return arch
    misses[arch] = miss
  # Nearest: fewest mismatches, and the MLP kind decides ties (an MoE is never a Llama).
  arch, miss = min(misses.items(), key=lambda kv: (len(kv[1]), 'mlp' in kv[1]))
  have = ', '.join(f'{k}={getattr(cfg, k)!r}' for k in miss)
  need = ', '.join(f'{k}={v!r}' for k, v in miss.items())
  raise UserError(f'no stock HuggingFace class for this model ({have}): the nearest, {arch}, '
                  f'needs {need}; supported: {", ".join(_NEEDS)}')


# ---------------------------------------------------------------------------------------------
# Configs.

def _hf_config(cfg: GPTConfig, arch: str, ids: dict) -> dict:
  if arch == 'GPT2LMHeadModel':
    c = dict(model_type='gpt2', n_embd=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head,
             n_inner=cfg.mlp_hidden, n_positions=cfg.seq_len, activation_function='gelu_new',
             layer_norm_epsilon=cfg.norm_eps, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
             attn_pdrop=0.0, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
             reorder_and_upcast_attn=False)
  else:
    # rope_theta top-level is what transformers 4.x reads, rope_parameters what 5.x reads.
    c = dict(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
             num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
             head_dim=cfg.head_dim, intermediate_size=cfg.mlp_hidden, hidden_act='silu',
             max_position_embeddings=cfg.seq_len, rms_norm_eps=cfg.norm_eps,
             rope_theta=cfg.rope_theta,
             rope_parameters=dict(rope_type='default', rope_theta=cfg.rope_theta),
             attention_dropout=0.0)
    if arch == 'LlamaForCausalLM':
      c.update(model_type='llama', attention_bias=cfg.bias, mlp_bias=cfg.bias)
    elif arch == 'Qwen2ForCausalLM':
      c.update(model_type='qwen2', use_sliding_window=False, sliding_window=None,
               max_window_layers=cfg.n_layer, layer_types=['full_attention'] * cfg.n_layer)
    else:
      # Our softmax gate over all experts, top-k kept without renormalising, is Qwen2-MoE's
      # router with norm_topk_prob=False; every k-th layer MoE is decoder_sparse_step=k.
      c.update(model_type='qwen2_moe', num_experts=cfg.moe_routed,
               num_experts_per_tok=cfg.moe_top_k, moe_intermediate_size=cfg.moe_hidden,
               shared_expert_intermediate_size=cfg.moe_shared * cfg.moe_hidden,
               norm_topk_prob=False, **_sparse_layers(cfg),
               use_sliding_window=False, qkv_bias=True)
  # Special ids are written even when None: GPT2Config would otherwise default them to 50256.
  c.update(architectures=[arch], vocab_size=cfg.vocab_size,
           tie_word_embeddings=cfg.tie_embeddings, torch_dtype='float32', dtype='float32',
           use_cache=True, **ids)
  c[_EXTRA_KEY] = dataclasses.asdict(cfg)
  return c


def _sparse_layers(cfg: GPTConfig) -> dict:
  """Qwen2-MoE's choice of MoE layers: every k-th (decoder_sparse_step), less mlp_only_layers."""
  if not cfg.moe_first_dense:
    return dict(decoder_sparse_step=cfg.moe_every, mlp_only_layers=[])
  return dict(decoder_sparse_step=1,
              mlp_only_layers=[i for i in range(cfg.n_layer) if not cfg.is_moe_layer(i)])


def _rope_theta(c: dict) -> float:
  rope = c.get('rope_parameters') or c.get('rope_scaling') or {}
  if rope.get('rope_type', rope.get('type', 'default')) != 'default':
    raise UserError(f'rope scaling {rope!r} has no counterpart in our model')
  return float(rope.get('rope_theta', c.get('rope_theta', 10000.0)))


def hf_config_to_ours(c: dict) -> GPTConfig:
  """GPTConfig from an HF config dict: HF fields decide, "zhgpt_jax" fills in the rest."""
  arch = (c.get('architectures') or [_BY_TYPE.get(c.get('model_type'), '')])[0]
  if arch == 'GPT2LMHeadModel':
    act = c.get('activation_function', 'gelu_new')
    if act not in ('gelu_new', 'gelu_pytorch_tanh') or c.get('scale_attn_by_inverse_layer_idx') \
        or c.get('add_cross_attention') or not c.get('scale_attn_weights', True):
      raise UserError(f'GPT-2 variant (activation_function={act!r}, scaled attention flags) '
                      'has no counterpart in our model')
    d = c['n_embd']
    hf = dict(d_model=d, n_layer=c['n_layer'], n_head=c['n_head'], n_kv_head=c['n_head'],
              mlp_hidden=c.get('n_inner') or 4 * d, seq_len=c['n_positions'], bias=True,
              position='learned', mlp='gelu', norm='layernorm',
              norm_eps=c.get('layer_norm_epsilon', 1e-5))
  elif arch in ('LlamaForCausalLM', 'Qwen2ForCausalLM', 'Qwen2MoeForCausalLM'):
    d, n = c['hidden_size'], c['num_attention_heads']
    if c.get('hidden_act', 'silu') != 'silu' or (c.get('head_dim') or d // n) != d // n:
      raise UserError(f'{arch} with hidden_act={c.get("hidden_act")!r}, '
                      f'head_dim={c.get("head_dim")} has no counterpart in our model')
    hf = dict(d_model=d, n_layer=c['num_hidden_layers'], n_head=n,
              n_kv_head=c.get('num_key_value_heads') or n, mlp_hidden=c['intermediate_size'],
              seq_len=c['max_position_embeddings'], position='rope', rope_theta=_rope_theta(c),
              norm='rmsnorm', norm_eps=c.get('rms_norm_eps', 1e-6))
    if arch == 'LlamaForCausalLM':
      if c.get('attention_bias', False) != c.get('mlp_bias', False):
        raise UserError('attention_bias != mlp_bias: our model has one bias switch for both')
      hf.update(mlp='swiglu', bias=c.get('attention_bias', False))
    elif arch == 'Qwen2ForCausalLM':
      if c.get('use_sliding_window'):
        raise UserError('Qwen2 with use_sliding_window=true has no counterpart in our model')
      hf.update(mlp='swiglu', bias=False, qkv_bias=True)
    else:
      f, shared = c['moe_intermediate_size'], c.get('shared_expert_intermediate_size', 0)
      # mlp_only_layers we model: the first k layers (moe.first_dense), every layer after MoE.
      dense_first = list(c.get('mlp_only_layers') or [])
      first_dense_ok = dense_first == list(range(len(dense_first))) and \
          (not dense_first or c.get('decoder_sparse_step', 1) == 1)
      if c.get('norm_topk_prob') or not first_dense_ok or c.get('use_sliding_window') \
          or shared % f:
        raise UserError('Qwen2-MoE with norm_topk_prob, mlp_only_layers other than the first '
                        'k, sliding windows or a shared expert width not a multiple of '
                        'moe_intermediate_size has no counterpart in our model')
      # Our own exports say (under "zhgpt_jax") when the q/k/v biases and the shared
      # expert's gate are fixed zeros; a stock Qwen2-MoE has both.
      ours = c.get(_EXTRA_KEY) or {}
      hf.update(mlp='moe', bias=False, moe_routed=c['num_experts'],
                moe_top_k=c['num_experts_per_tok'], moe_hidden=f, moe_shared=shared // f,
                moe_gate='softmax', moe_every=c.get('decoder_sparse_step', 1),
                qkv_bias=ours.get('qkv_bias', c.get('qkv_bias', True)),
                moe_shared_gate=ours.get('moe_shared_gate', bool(shared)),
                moe_first_dense=len(dense_first), moe_balance='aux')
  else:
    raise UserError(f'cannot import architecture {arch or "(none)"!r}: supported are '
                    f'{", ".join(_NEEDS)}')
  hf.update(vocab_size=c['vocab_size'],
            tie_embeddings=c.get('tie_word_embeddings', arch == 'GPT2LMHeadModel'))
  names = {f.name for f in dataclasses.fields(GPTConfig)}
  extra = {k: v for k, v in (c.get(_EXTRA_KEY) or {}).items() if k in names}
  cfg = GPTConfig(**{'real_vocab_size': hf['vocab_size'], **extra, **hf})
  return dataclasses.replace(cfg, attention=effective_attention(cfg.attention))


# ---------------------------------------------------------------------------------------------
# Tensors: one-to-one rows, then the special cases in each direction.

def _rows(cfg: GPTConfig, arch: str) -> list[Row]:
  rows: list[Row] = []
  if arch == 'GPT2LMHeadModel':
    rows += [('transformer.wte.weight', 'wte/embedding', _same, _same),
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

  rows += [('model.embed_tokens.weight', 'wte/embedding', _same, _same),
           ('model.norm.weight', 'ln_f/scale', _same, _same)]
  if not cfg.tie_embeddings:
    rows.append(('lm_head.weight', 'lm_head', _t, _t))
  for i in range(cfg.n_layer):
    hf, us = f'model.layers.{i}.', f'h_{i}/'
    rows += [(hf + 'input_layernorm.weight', us + 'ln_1/scale', _same, _same),
             (hf + 'post_attention_layernorm.weight', us + 'ln_2/scale', _same, _same)]
    for x in 'qkvo':
      rows.append((f'{hf}self_attn.{x}_proj.weight', f'{us}attn/{x}/kernel', _t, _t))
      if cfg.bias or (cfg.qkv_bias and x != 'o'):
        rows.append((f'{hf}self_attn.{x}_proj.bias', f'{us}attn/{x}/bias', _same, _same))
    if cfg.is_moe_layer(i):
      rows.append((hf + 'mlp.gate.weight', us + 'moe/router/kernel', _t, _t))
      if cfg.moe_shared and cfg.moe_shared_gate:
        rows.append((hf + 'mlp.shared_expert_gate.weight', us + 'moe/shared_gate/kernel', _t, _t))
      if cfg.moe_shared:
        # HF scales the shared expert by sigmoid(gate · x). Without a gate of our own we
        # export it as 0, i.e. a fixed 1/2, and double the down projection (exact: a power
        # of two).
        two = np.float32(1 if cfg.moe_shared_gate else 2)
        rows += [(hf + 'mlp.shared_expert.gate_proj.weight', us + 'moe/shared/gate/kernel', _t, _t),
                 (hf + 'mlp.shared_expert.up_proj.weight', us + 'moe/shared/up/kernel', _t, _t),
                 (hf + 'mlp.shared_expert.down_proj.weight', us + 'moe/shared/down/kernel',
                  lambda w: _t(w) * two, lambda w: _t(w) / two)]
    else:
      for x in ('gate', 'up', 'down'):
        rows.append((f'{hf}mlp.{x}_proj.weight', f'{us}mlp/{x}/kernel', _t, _t))
        if cfg.bias:
          rows.append((f'{hf}mlp.{x}_proj.bias', f'{us}mlp/{x}/bias', _same, _same))
  return rows


def _to_hf_tensors(cfg: GPTConfig, arch: str, flat: dict) -> dict[str, np.ndarray]:
  out = {hf: np.ascontiguousarray(to(flat[us]))
         for hf, us, to, _ in _rows(cfg, arch)}
  d, e = cfg.d_model, cfg.moe_routed
  for i in range(cfg.n_layer):
    if arch == 'GPT2LMHeadModel':
      a = f'h_{i}/attn/'
      out[f'transformer.h.{i}.attn.c_attn.weight'] = np.concatenate(
          [flat[a + x + '/kernel'] for x in 'qkv'], axis=1)
      out[f'transformer.h.{i}.attn.c_attn.bias'] = np.concatenate(
          [flat[a + x + '/bias'] for x in 'qkv'])
    elif arch == 'Qwen2MoeForCausalLM':
      hf, m = f'model.layers.{i}.', f'h_{i}/moe/'
      # Qwen2-MoE attention always has q/k/v biases in transformers 4.x: zeros are exact.
      for x, width in (('q', cfg.n_head), ('k', cfg.n_kv_head), ('v', cfg.n_kv_head)):
        if not cfg.qkv_bias:
          out[f'{hf}self_attn.{x}_proj.bias'] = np.zeros(width * cfg.head_dim, np.float32)
      if not cfg.is_moe_layer(i):
        continue
      if not (cfg.moe_shared and cfg.moe_shared_gate):
        out[hf + 'mlp.shared_expert_gate.weight'] = np.zeros((1, d), np.float32)
      if not cfg.moe_shared:   # HF always builds a shared expert: give it width 0
        for x, shape in (('gate', (0, d)), ('up', (0, d)), ('down', (d, 0))):
          out[f'{hf}mlp.shared_expert.{x}_proj.weight'] = np.zeros(shape, np.float32)
      # Per-expert tensors: the layout `save_pretrained` writes and every version reads.
      for j in range(e):
        for x in ('gate', 'up', 'down'):
          out[f'{hf}mlp.experts.{j}.{x}_proj.weight'] = _t(flat[f'{m}w_{x}'][j])
  return out


def _from_hf_tensors(cfg: GPTConfig, arch: str, t: dict[str, np.ndarray]) -> dict:
  used = set()

  def take(name):
    if name not in t:
      raise UserError(f'checkpoint lacks tensor {name} that {arch} needs')
    used.add(name)
    return t[name]

  def zero(name):
    if name in t and np.any(take(name)):
      raise UserError(f'{name} is not zero: our model has no counterpart for it')

  flat = {us: frm(take(hf)) for hf, us, _, frm in _rows(cfg, arch)}
  for i in range(cfg.n_layer):
    if arch == 'GPT2LMHeadModel':
      hf, a = f'transformer.h.{i}.attn.', f'h_{i}/attn/'
      ws = np.split(take(hf + 'c_attn.weight'), 3, axis=1)
      bs = np.split(take(hf + 'c_attn.bias'), 3)
      for x, w, b in zip('qkv', ws, bs):
        flat[a + x + '/kernel'], flat[a + x + '/bias'] = np.ascontiguousarray(w), b
    elif arch == 'Qwen2MoeForCausalLM':
      hf, m = f'model.layers.{i}.', f'h_{i}/moe/'
      for x in 'qkv' if not cfg.qkv_bias else '':
        zero(f'{hf}self_attn.{x}_proj.bias')
      if not cfg.is_moe_layer(i):
        continue
      if not (cfg.moe_shared and cfg.moe_shared_gate):
        take(hf + 'mlp.shared_expert_gate.weight')
        zero(hf + 'mlp.shared_expert_gate.weight')
      if not cfg.moe_shared:
        for x in ('gate', 'up', 'down'):
          zero(f'{hf}mlp.shared_expert.{x}_proj.weight')
      fused = hf + 'mlp.experts.gate_up_proj'
      if fused in t:   # transformers 5 `save_original_format=False`: [E, 2F, D] and [E, D, F]
        gate, up = np.split(take(fused), 2, axis=1)
        flat[m + 'w_gate'] = np.ascontiguousarray(gate.transpose(0, 2, 1))
        flat[m + 'w_up'] = np.ascontiguousarray(up.transpose(0, 2, 1))
        flat[m + 'w_down'] = np.ascontiguousarray(
            take(hf + 'mlp.experts.down_proj').transpose(0, 2, 1))
      else:
        for x in ('gate', 'up', 'down'):
          flat[m + 'w_' + x] = np.stack(
              [_t(take(f'{hf}mlp.experts.{j}.{x}_proj.weight')) for j in range(cfg.moe_routed)])
  # Buffers older checkpoints carry (causal masks, rotary tables) and a tied head are not
  # parameters; anything else left over means a structure we do not model.
  ignorable = ('.attn.bias', '.attn.masked_bias', 'rotary_emb.inv_freq', 'lm_head.weight')
  left = [k for k in t if k not in used and not k.endswith(ignorable)]
  if left:
    raise UserError(f'checkpoint has {len(left)} tensors {arch} as we map it does not use, '
                    f'e.g. {sorted(left)[:3]}')
  return traverse_util.unflatten_dict({k: v.astype(np.float32) for k, v in flat.items()},
                                      sep='/')


# ---------------------------------------------------------------------------------------------
# Files.

def _flat_params(cfg: GPTConfig, params) -> dict[str, np.ndarray]:
  """Params as {path: float32 array}; UserError when they do not fit `cfg`."""
  flat = traverse_util.flatten_dict(jax.device_get(params), sep='/')
  want = traverse_util.flatten_dict(
      jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0))), sep='/')
  got = {k: tuple(np.shape(v)) for k, v in flat.items()}
  if got != {k: v.shape for k, v in want.items()}:
    bad = sorted(set(got.items()) ^ {(k, v.shape) for k, v in want.items()})[:3]
    raise UserError(f'params do not match the model config, e.g. {bad}')
  return {k: np.asarray(v, np.float32) for k, v in flat.items()}


def _write_json(path: str, obj: dict) -> None:
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(obj, f, ensure_ascii=False, indent=2)


def _check_out_dir(out_dir: str, overwrite: bool, workdir: str | None = None) -> None:
  from zhgpt_jax import checkpoint   # a run (or a directory holding one) is never replaced
  checkpoint.refuse_run_target(out_dir, workdir, walk=overwrite)
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise UserError(f'export target {out_dir} exists and is not a directory')
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise UserError(f'export target {out_dir} exists and is not empty (pass --overwrite)')


def _replace_dir(tmp: str, out_dir: str) -> None:
  """Moves the finished `tmp` to `out_dir`; an old `out_dir` is renamed away, then deleted."""
  old = None
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    old = tempfile.mkdtemp(dir=os.path.dirname(out_dir), prefix='.old-')
    os.rename(out_dir, os.path.join(old, 'x'))
  elif os.path.isdir(out_dir):
    os.rmdir(out_dir)
  os.rename(tmp, out_dir)
  if old:
    shutil.rmtree(old)


def export_hf(cfg: GPTConfig, params, out_dir: str, tokenizer_dir: str | None = None,
              overwrite: bool = False, sample_cfg=None, run: dict | None = None,
              workdir: str | None = None) -> str:
  """Writes `params` as a HuggingFace directory (float32 safetensors); returns its path.

  Writes config.json, model.safetensors, generation_config.json (stop ids, `sample_cfg`'s
  sampling defaults, vocab padding suppressed), the tokenizer files found in
  `tokenizer_dir` with the chat template, and a model card README.md (with what `run`
  recorded: config, step, val metrics), into a temporary directory renamed to `out_dir` at
  the end; files and directories get ordinary permissions.
  Raises UserError when the model has no stock HF class, the params do not fit `cfg`, the
  tokenizer does not fit the model, or `out_dir` is a run or (without `overwrite`) not empty.
  """
  arch = hf_architecture(cfg)
  _check_out_dir(out_dir, overwrite, workdir)
  out_dir = os.path.abspath(out_dir)
  flat = _flat_params(cfg, params)
  ids, stop = export_files.special_ids(tokenizer_dir, cfg)
  os.makedirs(os.path.dirname(out_dir), exist_ok=True)
  tmp = tempfile.mkdtemp(dir=os.path.dirname(out_dir),
                         prefix=f'.{os.path.basename(out_dir)}.tmp-')
  try:
    save_file(_to_hf_tensors(cfg, arch, flat), os.path.join(tmp, 'model.safetensors'),
              metadata={'format': 'pt'})
    _write_json(os.path.join(tmp, 'config.json'), _hf_config(cfg, arch, ids))
    _write_json(os.path.join(tmp, 'generation_config.json'),
                export_files.generation_config(cfg, ids, stop, sample_cfg))
    if tokenizer_dir:
      export_files.copy_tokenizer_files(tokenizer_dir, tmp)
    with open(os.path.join(tmp, 'README.md'), 'w', encoding='utf-8') as f:
      f.write(export_files.model_card(cfg, arch, sum(v.size for v in flat.values()),
                                      tokenizer_dir, run))
    export_files.ordinary_permissions(tmp)
    _replace_dir(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir


def _load_tensors(path: str) -> dict[str, np.ndarray]:
  single = os.path.join(path, 'model.safetensors')
  index = os.path.join(path, 'model.safetensors.index.json')
  if os.path.isfile(single):
    return load_file(single)
  if os.path.isfile(index):
    with open(index, encoding='utf-8') as f:
      files = sorted(set(json.load(f)['weight_map'].values()))
    return {k: v for name in files for k, v in load_file(os.path.join(path, name)).items()}
  binary = os.path.join(path, 'pytorch_model.bin')
  if os.path.isfile(binary):
    try:
      import torch
    except ImportError as e:
      raise UserError(f'{binary} needs torch to read; convert it to safetensors') from e
    state = torch.load(binary, map_location='cpu', weights_only=True)
    return {k: v.float().numpy() for k, v in state.items()}
  raise UserError(f'no weights in {path}: expected model.safetensors, '
                  'model.safetensors.index.json or pytorch_model.bin')


def _with_prefix(t: dict[str, np.ndarray], arch: str) -> dict[str, np.ndarray]:
  # Checkpoints saved from the bare base model (e.g. OpenAI's gpt2) lack the prefix.
  prefix = 'transformer.' if arch == 'GPT2LMHeadModel' else 'model.'
  return {k if k.startswith((prefix, 'lm_head.')) else prefix + k: v for k, v in t.items()}


def import_hf(path: str) -> tuple[GPTConfig, Any]:
  """Loads a GPT2LMHeadModel / LlamaForCausalLM / Qwen2MoeForCausalLM directory.

  Returns (GPTConfig, float32 numpy params in our layout). Raises UserError for other
  architectures or for weights our model cannot represent exactly (e.g. a non-zero
  Qwen2-MoE shared_expert_gate).
  """
  config_path = os.path.join(path, 'config.json')
  if not os.path.isfile(config_path):
    raise UserError(f'no HuggingFace model at {path}: {config_path} does not exist')
  try:
    with open(config_path, encoding='utf-8') as f:
      cfg = hf_config_to_ours(json.load(f))
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise UserError(f'{config_path} is not a usable config ({type(e).__name__}: {e})') from None
  arch = hf_architecture(cfg)
  try:
    tensors = _load_tensors(path)
  except (SafetensorError, OSError, ValueError, RuntimeError, EOFError) as e:  # damaged file
    raise UserError(f'cannot read the weights in {path} ({type(e).__name__}: '
                    f'{" ".join(str(e).split())[:200]}); is the download complete?') from None
  return cfg, _from_hf_tensors(cfg, arch, _with_prefix(tensors, arch))


def export_workdir(workdir: str, out_dir: str, overwrite: bool = False,
                   step: int | None = None) -> str:
  """`main.py export`: a workdir's latest (or `step`) checkpoint as a HuggingFace directory."""
  from zhgpt_jax import checkpoint
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise UserError(f'{workdir}: no checkpoints to export; train first')
  cfg, params, _, config, meta = checkpoint.load_model(workdir, step)
  hf_architecture(cfg)   # refuse before writing anything
  run = dict(config=config.to_dict(), step=meta['step'], val=meta.get('val'))
  return export_hf(cfg, params, out_dir, os.path.join(workdir, 'tokenizer'), overwrite,
                   config.sample, run, workdir)
