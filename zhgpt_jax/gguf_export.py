"""Export to GGUF, the one-file format llama.cpp and Ollama run (`main.py export --format gguf`).

Written with `gguf`, llama.cpp's own reader/writer library. Each of our families maps onto a
llama.cpp architecture that computes exactly what our model does:

  GPT-2 (learned positions, GELU, LayerNorm, biases)            -> gpt2
  Llama-style (RoPE, SwiGLU, RMSNorm; GQA; biases optional)    -> llama
  the same with q/k/v biases only (model.qkv_bias)              -> qwen2
  MoE, softmax gate, shared experts always on (ours)            -> deepseek (DeepSeekMoE:
      first dense layers, ungated shared experts, top-k weights not renormalised)
  MoE, softmax gate, sigmoid-gated shared experts (Qwen2-MoE)   -> qwen2moe
  MoE with a sigmoid gate and/or DeepSeek-V3's routing bias    -> glm4moe (DeepSeek-V3's
      routing -- bias for the choice only, sigmoid weights renormalised over the chosen k --
      with ordinary attention)

Anything else (e.g. MoE every k-th layer, RoPE with GELU) is refused in one line saying why. The tokenizer goes in too: vocab, merges, token types, the
special ids, the chat template and the pre-tokenizer, named by what the tokenizer really
does (our byte-level BPE splits with GPT-2's regex: llama.cpp's `gpt-2`). The padding rows
of the vocabulary (ids >= real_vocab_size, never in data) are left out, so llama.cpp can
never sample them.

Layouts: GGUF (like torch) stores a matrix as [out, in]; our Dense kernels are [in, out].
llama.cpp's `llama` and `deepseek` rotate interleaved pairs where we (and HF) rotate halves,
so their q/k rows are permuted to match.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from zhgpt_jax import __version__
from zhgpt_jax import export_files
from zhgpt_jax import tokenizer as tokenizer_lib
from zhgpt_jax.config import UserError
from zhgpt_jax.gpt_config import GPTConfig

TYPES = ('f32', 'f16', 'bf16', 'q8_0')

# The pre-tokenizers llama.cpp implements that a tokenizer.json can be checked against: the
# GPT-2 regex is what a ByteLevel pre-tokenizer with use_regex=True applies; Qwen2's is a
# Split with its own regex followed by a ByteLevel without one.
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def architecture(cfg: GPTConfig) -> str:
  """The llama.cpp architecture that computes `cfg`'s model; UserError saying why none does."""
  if cfg.qk_norm or cfg.logit_softcap:
    raise UserError(f'GGUF: QK-norm or logit soft-capping (model.qk_norm={cfg.qk_norm}, '
                    f'logit_softcap={cfg.logit_softcap}) is not written here (a QK-normed '
                    'Llama-style model exports to HuggingFace as Qwen3ForCausalLM); not exported')
  if cfg.position == 'learned' and cfg.mlp == 'gelu' and cfg.norm == 'layernorm':
    if not cfg.bias:
      raise UserError('GGUF: llama.cpp\'s gpt2 needs the biases (model.bias=true); not exported')
    if cfg.n_kv_head != cfg.n_head:
      raise UserError('GGUF: llama.cpp\'s gpt2 has no grouped-query attention '
                      f'(model.n_kv_head={cfg.n_kv_head} != n_head={cfg.n_head}); not exported')
    return 'gpt2'
  if cfg.attention_kind == 'mla':
    raise UserError('GGUF: multi-head latent attention (model.attention_kind=mla) is llama.cpp\'s '
                    'deepseek2, not written here: export to HuggingFace (DeepseekV3ForCausalLM) '
                    'and convert that; not exported')
  if cfg.mlp == 'moe' and (cfg.moe.n_group > 1 or cfg.moe.routed_scale != 1.0):
    raise UserError(f'GGUF: group-limited routing or scaled gates (model.moe.n_group='
                    f'{cfg.moe.n_group}, routed_scale={cfg.moe.routed_scale}) are not written '
                    'here; not exported')
  if cfg.position != 'rope' or cfg.norm != 'rmsnorm' or cfg.mlp not in ('swiglu', 'moe'):
    raise UserError(f'GGUF: no llama.cpp architecture computes position={cfg.position}, '
                    f'norm={cfg.norm}, mlp={cfg.mlp} (gpt2 is learned+layernorm+gelu, the '
                    'others rope+rmsnorm+swiglu/moe); not exported')
  if cfg.mlp == 'swiglu':
    if cfg.qkv_bias and not cfg.bias:
      return 'qwen2'
    return 'llama'
  if cfg.moe.every != 1:
    raise UserError(f'GGUF: model.moe.every={cfg.moe.every}: llama.cpp\'s MoE architectures '
                    'put experts in every layer after the first dense ones; not exported')
  if cfg.bias:
    raise UserError('GGUF: llama.cpp\'s MoE architectures have no MLP biases (model.bias=true)'
                    '; not exported')
  if cfg.moe.gate != 'softmax' or cfg.moe.balance == 'bias':
    if cfg.moe.shared_gate:
      raise UserError('GGUF: glm4moe (the sigmoid gate / routing bias) has no gate on the '
                      'shared experts (model.moe.shared_gate=true); not exported')
    return 'glm4moe'
  if cfg.moe.shared_gate:
    if cfg.moe.first_dense:
      raise UserError('GGUF: qwen2moe (gated shared experts) has no dense first layers '
                      f'(model.moe.first_dense={cfg.moe.first_dense}); not exported')
    return 'qwen2moe'
  return 'deepseek'


# ---------------------------------------------------------------------------------------------
# Tensors: GGUF name -> float32 array in GGUF's [out, in] layout.

def _t(w) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(w, np.float32).T)


def _interleave(w: np.ndarray, heads: int) -> np.ndarray:
  """Rows of q or k (a [heads·H, ...] weight or a [heads·H] bias) from rotate-half order to
  llama.cpp's interleaved pairs: per head, (x0, x_{H/2}, x1, x_{H/2+1}, ...)."""
  return np.ascontiguousarray(
      w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def tensors(cfg: GPTConfig, arch: str, flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Our flat params ({'h_0/attn/q/kernel': ...}) as GGUF tensors of llama.cpp's `arch`."""
  v = cfg.real_vocab_size
  out = {'token_embd.weight': flat['wte/embedding'][:v], 'output_norm.weight': flat['ln_f/scale']}
  if not cfg.tie_embeddings:
    out['output.weight'] = _t(flat['lm_head'])[:v]
  elif arch == 'qwen2moe':   # qwen2moe requires output.weight; the others reuse token_embd
    out['output.weight'] = out['token_embd.weight']
  if arch == 'gpt2':
    out['position_embd.weight'] = flat['wpe/embedding']
    out['output_norm.bias'] = flat['ln_f/bias']
  permute = arch in ('llama', 'deepseek')
  for i in range(cfg.n_layer):
    us, blk = f'h_{i}/', f'blk.{i}.'
    out[blk + 'attn_norm.weight'] = flat[us + 'ln_1/scale']
    # glm4moe calls the norm before the MLP "post-attention"; the others "ffn"
    out[blk + ('post_attention_norm' if arch == 'glm4moe' else 'ffn_norm') + '.weight'] = \
        flat[us + 'ln_2/scale']
    a = us + 'attn/'
    if arch == 'gpt2':
      out[blk + 'attn_norm.bias'] = flat[us + 'ln_1/bias']
      out[blk + 'ffn_norm.bias'] = flat[us + 'ln_2/bias']
      out[blk + 'attn_qkv.weight'] = _t(np.concatenate([flat[a + x + '/kernel'] for x in 'qkv'], 1))
      out[blk + 'attn_qkv.bias'] = np.concatenate([flat[a + x + '/bias'] for x in 'qkv'])
      out[blk + 'attn_output.weight'] = _t(flat[a + 'o/kernel'])
      out[blk + 'attn_output.bias'] = flat[a + 'o/bias']
      out[blk + 'ffn_up.weight'] = _t(flat[us + 'mlp/fc/kernel'])
      out[blk + 'ffn_up.bias'] = flat[us + 'mlp/fc/bias']
      out[blk + 'ffn_down.weight'] = _t(flat[us + 'mlp/proj/kernel'])
      out[blk + 'ffn_down.bias'] = flat[us + 'mlp/proj/bias']
      continue
    for x, name, heads in (('q', 'attn_q', cfg.n_head), ('k', 'attn_k', cfg.n_kv_head),
                           ('v', 'attn_v', 0), ('o', 'attn_output', 0)):
      w, b = _t(flat[a + x + '/kernel']), flat.get(a + x + '/bias')
      if permute and heads:
        w, b = _interleave(w, heads), None if b is None else _interleave(b, heads)
      out[blk + name + '.weight'] = w
      if b is not None:
        out[blk + name + '.bias'] = b
    if not cfg.is_moe_layer(i):
      for x in ('gate', 'up', 'down'):
        out[f'{blk}ffn_{x}.weight'] = _t(flat[f'{us}mlp/{x}/kernel'])
        if cfg.bias:
          out[f'{blk}ffn_{x}.bias'] = flat[f'{us}mlp/{x}/bias']
      continue
    m = us + 'moe/'
    out[blk + 'ffn_gate_inp.weight'] = _t(flat[m + 'router/kernel'])
    for x in ('gate', 'up', 'down'):   # [E, in, out] -> [E, out, in]
      out[f'{blk}ffn_{x}_exps.weight'] = np.ascontiguousarray(
          np.asarray(flat[f'{m}w_{x}'], np.float32).transpose(0, 2, 1))
      if cfg.moe.n_shared:
        out[f'{blk}ffn_{x}_shexp.weight'] = _t(flat[f'{m}shared/{x}/kernel'])
      else:   # both architectures always run a shared expert: one of zeros adds exactly 0
        d, f = cfg.d_model, cfg.moe.expert_hidden
        out[f'{blk}ffn_{x}_shexp.weight'] = np.zeros((d, f) if x == 'down' else (f, d),
                                                     np.float32)
    if arch == 'glm4moe':   # the routing bias: for the choice only, as ours
      out[blk + 'exp_probs_b.bias'] = np.asarray(
          flat.get(m + 'expert_bias', np.zeros(cfg.moe.n_routed)), np.float32)
    if arch == 'qwen2moe':
      out[blk + 'ffn_gate_inp_shexp.weight'] = np.asarray(flat[m + 'shared_gate/kernel'],
                                                          np.float32)[:, 0]
  return {k: np.ascontiguousarray(np.asarray(w, np.float32)) for k, w in out.items()}


def _stored_type(name: str, w: np.ndarray, gguf_type: str):
  """(the GGML type `name` is stored in, the array to write) under llama.cpp's converter's
  rules: 1-D tensors, norms, routers and position embeddings stay float32; a matrix whose rows
  q8_0 cannot split into blocks of 32 falls back to float16."""
  import gguf
  q = gguf.GGMLQuantizationType
  keep_f32 = (w.ndim == 1 or name.endswith('_norm.weight') or 'ffn_gate_inp' in name
              or name.startswith('position_embd'))
  qtype = dict(f32=q.F32, f16=q.F16, bf16=q.BF16, q8_0=q.Q8_0)[gguf_type]
  if keep_f32 or qtype == q.F32:
    return q.F32, w
  if qtype == q.F16:
    return q.F16, w.astype(np.float16)
  if qtype == q.Q8_0 and w.shape[-1] % gguf.GGML_QUANT_SIZES[q.Q8_0][0]:
    return q.F16, w.astype(np.float16)
  return qtype, gguf.quants.quantize(w, qtype)


# ---------------------------------------------------------------------------------------------
# Tokenizer.

def pre_tokenizer_name(tokenizer_json: dict) -> str:
  """llama.cpp's name (tokenizer.ggml.pre) for the pre-tokenizer of a tokenizer.json; UserError
  when it is not one llama.cpp splits identically."""
  pre, norm = tokenizer_json.get('pre_tokenizer') or {}, tokenizer_json.get('normalizer')
  model = tokenizer_json.get('model') or {}
  if model.get('type') != 'BPE' or (tokenizer_json.get('decoder') or {}).get('type') != 'ByteLevel':
    raise UserError(f'GGUF: the tokenizer is {model.get("type")} without a ByteLevel decoder; '
                    'llama.cpp reads byte-level BPE (ours) this way; not exported')
  if pre.get('type') == 'ByteLevel' and pre.get('use_regex', True) and \
      not pre.get('add_prefix_space') and norm is None:
    return 'gpt-2'
  steps = pre.get('pretokenizers') or []
  if pre.get('type') == 'Sequence' and len(steps) == 2 and steps[0].get('type') == 'Split' \
      and (steps[0].get('pattern') or {}).get('Regex') == _QWEN2_REGEX \
      and steps[1].get('type') == 'ByteLevel' and not steps[1].get('use_regex', True):
    return 'qwen2'
  raise UserError(f'GGUF: the tokenizer\'s pre-tokenizer ({json.dumps(pre)[:120]}) is not one '
                  'llama.cpp is known to split identically (GPT-2\'s or Qwen2\'s); not exported')


def _vocab(tokenizer_dir: str, n_tokens: int) -> dict:
  """Tokens, token types, merges, pre-tokenizer, special ids and chat template."""
  with open(tokenizer_lib.json_path(tokenizer_dir), encoding='utf-8') as f:
    spec = json.load(f)
  pre = pre_tokenizer_name(spec)
  tok = tokenizer_lib.load_tokenizer(tokenizer_dir)
  if tok.get_vocab_size() != n_tokens:
    raise UserError(f'tokenizer {tokenizer_dir} has {tok.get_vocab_size()} tokens but the model '
                    f'was built for {n_tokens}: wrong tokenizer directory?')
  added = {t['id']: t for t in spec.get('added_tokens') or []}
  tokens, types = [], []
  for i in range(n_tokens):
    tokens.append(tok.id_to_token(i))
    types.append(1 if i not in added else 3 if added[i].get('special') else 4)  # normal/control/user
  merges = [m if isinstance(m, str) else ' '.join(m) for m in spec['model'].get('merges') or []]
  ids = tokenizer_lib.special_ids(tok)
  template = export_files.chat_template(tokenizer_dir)
  return dict(tokens=tokens, types=types, merges=merges, pre=pre, ids=ids, template=template)


# ---------------------------------------------------------------------------------------------
# The file.

def _metadata(writer, cfg: GPTConfig, arch: str, vocab: dict, gguf_type: str, run) -> None:
  import gguf
  ftype = dict(f32=gguf.LlamaFileType.ALL_F32, f16=gguf.LlamaFileType.MOSTLY_F16,
               bf16=gguf.LlamaFileType.MOSTLY_BF16, q8_0=gguf.LlamaFileType.MOSTLY_Q8_0)
  writer.add_name('zhgpt-jax')
  writer.add_description(f'exported by zhgpt-jax {__version__}: {export_files.shape_text(cfg)}'
                         + (f'; {run["step"]:,} steps of task {run["config"]["task"]}'
                            if run else ''))
  writer.add_string('zhgpt_jax.version', __version__)
  writer.add_file_type(ftype[gguf_type])
  writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
  writer.add_context_length(cfg.seq_len)
  writer.add_embedding_length(cfg.d_model)
  writer.add_block_count(cfg.n_layer)
  writer.add_feed_forward_length(cfg.mlp_hidden)
  writer.add_head_count(cfg.n_head)
  writer.add_head_count_kv(cfg.n_kv_head)
  writer.add_vocab_size(cfg.real_vocab_size)
  if arch == 'gpt2':
    writer.add_layer_norm_eps(cfg.norm_eps)
  else:
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.head_dim)
  if cfg.mlp == 'moe':
    writer.add_expert_count(cfg.moe.n_routed)
    writer.add_expert_used_count(cfg.moe.top_k)
    writer.add_expert_feed_forward_length(cfg.moe.expert_hidden)
    if arch in ('deepseek', 'glm4moe'):
      writer.add_expert_shared_count(max(cfg.moe.n_shared, 1))
      writer.add_leading_dense_block_count(cfg.moe.first_dense)
      writer.add_expert_weights_scale(1.0)
    if arch == 'glm4moe':
      # ours renormalises sigmoid's k (moe.norm_topk)
      writer.add_expert_weights_norm(cfg.moe.gate == 'sigmoid' and cfg.moe.norm_topk)
      writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if cfg.moe.gate == 'sigmoid'
                                    else gguf.ExpertGatingFuncType.SOFTMAX)
    else:
      writer.add_expert_shared_feed_forward_length(cfg.moe.n_shared * cfg.moe.expert_hidden)
  writer.add_tokenizer_model('gpt2')   # llama.cpp's name for byte-level BPE
  writer.add_tokenizer_pre(vocab['pre'])
  writer.add_token_list(vocab['tokens'])
  writer.add_token_types(vocab['types'])
  writer.add_token_merges(vocab['merges'])
  ids = vocab['ids']
  writer.add_bos_token_id(ids.eos if ids.bos is None else ids.bos)
  writer.add_eos_token_id(ids.eos)
  writer.add_pad_token_id(ids.pad)
  if ids.im_end is not None:
    writer.add_eot_token_id(ids.im_end)   # a chat turn ends here: llama.cpp stops at it
  writer.add_add_bos_token(False)
  writer.add_add_eos_token(False)
  if vocab['template']:
    writer.add_chat_template(vocab['template'])


def write_gguf(cfg: GPTConfig, flat: dict[str, np.ndarray], path: str, tokenizer_dir: str,
               gguf_type: str = 'f32', run: dict | None = None) -> dict:
  """Writes the GGUF file `path` (under a temporary name, renamed at the end).

  `flat`: our params flattened with '/' (float32 numpy). Returns a summary: arch, type,
  tensors, bytes. Raises UserError when no llama.cpp architecture fits, or the tokenizer
  does not fit the model or llama.cpp.
  """
  import gguf
  if gguf_type not in TYPES:
    raise UserError(f'GGUF type {gguf_type!r}: expected one of {", ".join(TYPES)}')
  arch = architecture(cfg)
  vocab = _vocab(tokenizer_dir, cfg.real_vocab_size)
  named = tensors(cfg, arch, flat)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f'.{os.path.basename(path)}.tmp-')
  os.close(fd)
  try:
    writer = gguf.GGUFWriter(tmp, arch)
    _metadata(writer, cfg, arch, vocab, gguf_type, run)
    for name, w in named.items():
      qtype, data = _stored_type(name, w, gguf_type)
      writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o644 & ~umask)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return dict(arch=arch, type=gguf_type, tensors=len(named), bytes=os.path.getsize(path),
              pre=vocab['pre'])


def modelfile(gguf_name: str, vocab_template: bool, stop: list[str]) -> str:
  """An Ollama Modelfile for the GGUF file `gguf_name` beside it: ChatML when the model has it."""
  lines = [f'FROM ./{gguf_name}', '']
  if vocab_template:
    lines += ['TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}',
              '{{ .Content }}<|im_end|>', '{{ end }}<|im_start|>assistant', '"""']
  else:
    lines += ['TEMPLATE """{{ .Prompt }}"""']
  lines += [f'PARAMETER stop "{s}"' for s in stop]
  return '\n'.join(lines) + '\n'


def export_workdir(workdir: str, out: str, gguf_type: str = 'f32', overwrite: bool = False,
                   step: int | None = None) -> str:
  """`main.py export --format gguf`: a workdir's latest (or `step`) checkpoint as one .gguf
  file, with an Ollama Modelfile beside it (`<name>.Modelfile`); returns the file's path."""
  from flax import traverse_util
  import jax
  from zhgpt_jax import checkpoint
  if gguf_type not in TYPES:
    raise UserError(f'--gguf_type {gguf_type}: expected one of {", ".join(TYPES)}')
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise UserError(f'{workdir}: no checkpoints to export; train first')
  if os.path.isdir(out):
    raise UserError(f'export target {out} is a directory; name the .gguf file to write')
  if os.path.exists(out) and not overwrite:
    raise UserError(f'export target {out} exists (pass --overwrite)')
  export_files.refuse_run_target(out, workdir)
  cfg, params, tok, config, meta = checkpoint.load_model(workdir, step)
  architecture(cfg)   # refuse before reading anything else
  flat = {k: np.asarray(v, np.float32)
          for k, v in traverse_util.flatten_dict(jax.device_get(params), sep='/').items()}
  run = dict(config=config.to_dict(), step=meta['step'])
  tok_dir = os.path.join(workdir, 'tokenizer')
  summary = write_gguf(cfg, flat, out, tok_dir, gguf_type, run)
  ids = tokenizer_lib.special_ids(tok)
  stop = [tok.id_to_token(i) for i in ids.stop]
  base = os.path.splitext(out)[0]
  with open(base + '.Modelfile', 'w', encoding='utf-8') as f:
    f.write(modelfile(os.path.basename(out), ids.im_end is not None, stop))
  print(f'gguf: {summary["arch"]}, {summary["type"]}, {summary["tensors"]} tensors, '
        f'{summary["bytes"] / 2**20:.1f} MiB, pre-tokenizer {summary["pre"]}; Ollama: '
        f'ollama create NAME -f {base}.Modelfile')
  return out
