"""Export to, and import from, HuggingFace transformers directories.

What each transformers class needs, its config.json fields and its tensor mapping are one
entry each in hf_classes.py; this module picks the class (`hf_architecture`), writes and reads
the files, and never names a class. A model no class fits (e.g. RoPE with GELU, a sigmoid MoE
gate) is refused with the fields at fault. Fields HF has no place for (real vocab size,
dropout, compute dtype, ...) ride along in config.json under "zhgpt_jax" so a round trip is
exact. Exporting needs no torch (numpy + safetensors); only importing a .bin checkpoint does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

from flax import traverse_util
import jax
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from zhgpt_jax import files
from zhgpt_jax import export_files
from zhgpt_jax import gpt_config
from zhgpt_jax import hf_deepseek  # noqa: F401  (registers DeepseekV3 and Glm4-MoE)
from zhgpt_jax.config import UserError
from zhgpt_jax.hf_classes import CLASSES, Checkpoint, HFClass, _same, by_name
from zhgpt_jax.model import GPTConfig, effective_attention, init_params

_EXTRA_KEY = 'zhgpt_jax'


# What every class needs unless its entry says otherwise: multi-head attention (latent
# attention is DeepSeek's), no QK-norm (Qwen3's), no logit soft-capping (no stock class of
# these layouts has it), and why.
NEEDS = {'attention_kind': 'mha', 'qk_norm': False, 'logit_softcap': 0.0}
WHY = {'logit_softcap': "no stock class of this layout soft-caps its logits: Gemma 2's "
                        'final_logit_softcapping comes with another architecture'}


def _misses(entry: HFClass, cfg: GPTConfig) -> dict:
  needs = {**NEEDS, **entry.needs}
  miss = {k: v for k, v in needs.items() if gpt_config.get(cfg, k) != v}
  return {**miss, **(entry.check(cfg) if entry.check else {})}


def hf_architecture(cfg: GPTConfig) -> str:
  """The transformers class `cfg` exports to (the first in hf_classes.CLASSES whose needs it
  meets); UserError naming the fields that do not map."""
  # With biases everywhere, the q/k/v-only switch changes nothing.
  cfg = dataclasses.replace(cfg, qkv_bias=cfg.qkv_bias and not cfg.bias)
  misses = {}
  for name, entry in CLASSES.items():
    misses[name] = _misses(entry, cfg)
    if not misses[name]:
      return name
  # Nearest: fewest mismatches; the MLP kind, then the attention kind, decides ties (an MoE
  # is never a Llama, an MLA model never a Qwen2-MoE).
  arch, miss = min(misses.items(), key=lambda kv: (len(kv[1]), 'mlp' in kv[1],
                                                   'attention_kind' in kv[1]))
  have = ', '.join(f'{k}={gpt_config.get(cfg, k)!r}' for k in miss)
  need = ', '.join(f'{k}={v!r}' for k, v in miss.items())
  whys = {**WHY, **CLASSES[arch].why}
  why = ''.join(f' ({whys[k]})' for k in miss if k in whys)
  raise UserError(f'no stock HuggingFace class for this model ({have}): the nearest, {arch}, '
                  f'needs {need}{why}; supported: {", ".join(CLASSES)}')


def _hf_config(cfg: GPTConfig, arch: str, ids: dict) -> dict:
  c = CLASSES[arch].to_config(cfg)
  # Special ids are written even when None: GPT2Config would otherwise default them to 50256.
  c.update(architectures=[arch], vocab_size=cfg.vocab_size,
           tie_word_embeddings=cfg.tie_embeddings, torch_dtype='float32', dtype='float32',
           use_cache=True, **ids)
  c[_EXTRA_KEY] = dataclasses.asdict(cfg)
  return c


def hf_config_to_ours(c: dict) -> GPTConfig:
  """GPTConfig from an HF config dict: HF fields decide, "zhgpt_jax" fills in the rest."""
  entry = by_name(c)
  ours = gpt_config.flatten(c.get(_EXTRA_KEY) or {})
  hf = entry.from_config(c, ours)
  hf.update(vocab_size=c['vocab_size'],
            tie_embeddings=c.get('tie_word_embeddings', entry.tied_by_default))
  cfg = gpt_config.from_flat({'real_vocab_size': hf['vocab_size'], **ours, **hf})
  return dataclasses.replace(cfg, attention=effective_attention(cfg.attention))


def _to_hf_tensors(cfg: GPTConfig, arch: str, flat: dict) -> dict[str, np.ndarray]:
  entry = CLASSES[arch]
  out = {hf: np.ascontiguousarray(to(flat[us])) for hf, us, to, _ in entry.rows(cfg)}
  if entry.to_tensors:
    entry.to_tensors(cfg, flat, out)
  return out


def _param_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(
      jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0))), sep='/').items()}


def hf_shapes(cfg: GPTConfig, arch: str) -> dict[str, tuple[int, ...]]:
  """The shape of every tensor an HF directory of model `cfg` holds, by name (what the class's
  hooks write in each layout it reads), without building any array."""
  entry, ours = CLASSES[arch], _param_shapes(cfg)
  out = {hf: ours[us] if to is _same else ours[us][::-1]   # the rest are transposes
         for hf, us, to, _ in entry.rows(cfg)}
  if entry.shapes:
    out.update(entry.shapes(cfg, ours))
  return out


def row_names(cfg: GPTConfig, arch: str) -> list[str]:
  """The HF names of the tensors that map one to one (every checkpoint of `arch` has them)."""
  return [hf for hf, *_ in CLASSES[arch].rows(cfg)]


def _from_hf_tensors(cfg: GPTConfig, arch: str, t: dict[str, np.ndarray]) -> dict:
  entry, ckpt = CLASSES[arch], Checkpoint(t, arch)
  flat = {us: frm(ckpt.take(hf)) for hf, us, _, frm in entry.rows(cfg)}
  if entry.from_tensors:
    entry.from_tensors(cfg, ckpt, flat)
  # Buffers older checkpoints carry (causal masks, rotary tables) and a tied head are not
  # parameters; anything else left over means a structure we do not model.
  left = ckpt.unused(('.attn.bias', '.attn.masked_bias', 'rotary_emb.inv_freq', 'lm_head.weight'))
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
  want = _param_shapes(cfg)
  got = {k: tuple(np.shape(v)) for k, v in flat.items()}
  if got != want:
    bad = sorted(set(got.items()) ^ set(want.items()))[:3]
    raise UserError(f'params do not match the model config, e.g. {bad}')
  return {k: np.asarray(v, np.float32) for k, v in flat.items()}


def _check_out_dir(out_dir: str, overwrite: bool, workdir: str | None = None) -> None:
  # a run (or a directory holding one) is never replaced
  export_files.refuse_run_target(out_dir, workdir, walk=overwrite)
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise UserError(f'export target {out_dir} exists and is not a directory')
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise UserError(f'export target {out_dir} exists and is not empty (pass --overwrite)')


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
  files.sweep(os.path.dirname(out_dir), of=out_dir)   # a killed export's, nothing else there
  tmp = files.temp_path(out_dir)
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    save_file(_to_hf_tensors(cfg, arch, flat), os.path.join(tmp, 'model.safetensors'),
              metadata={'format': 'pt'})
    files.write_json(os.path.join(tmp, 'config.json'), _hf_config(cfg, arch, ids))
    files.write_json(os.path.join(tmp, 'generation_config.json'),
                export_files.generation_config(cfg, ids, stop, sample_cfg))
    if tokenizer_dir:
      export_files.copy_tokenizer_files(tokenizer_dir, tmp)
    with open(os.path.join(tmp, 'README.md'), 'w', encoding='utf-8') as f:
      f.write(export_files.model_card(cfg, arch, sum(v.size for v in flat.values()),
                                      tokenizer_dir, run))
    export_files.ordinary_permissions(tmp)
    files.replace_dir(tmp, out_dir)
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


def with_prefix(t: dict[str, np.ndarray], arch: str) -> dict[str, np.ndarray]:
  # Checkpoints saved from the bare base model (e.g. OpenAI's gpt2) lack the prefix.
  prefix = CLASSES[arch].prefix
  return {k if k.startswith((prefix, 'lm_head.')) else prefix + k: v for k, v in t.items()}


def import_hf(path: str) -> tuple[GPTConfig, Any]:
  """Loads a HuggingFace directory of a class in hf_classes.CLASSES.

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
  return cfg, _from_hf_tensors(cfg, arch, with_prefix(tensors, arch))


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
