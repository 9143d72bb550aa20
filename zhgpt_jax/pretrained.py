"""Starting from a pretrained model: `init_from=hf:DIR` (or a workdir of ours).

`resolve(config, explicit)` makes the run's config describe the model it starts from:
config.model's shape fields (`shape_paths`) come from DIR's config.json, config.tokenizer.path
points at DIR's tokenizer (so `prepare` cuts the shards with it, never with a freshly
trained one), model.seq_len may stay shorter than DIR's context, and an SFT run whose
tokenizer lacks the ChatML tokens gets room for them. Fields that only change compute
(dtype, attention, remat, dropout) are left as configured. A shape field set explicitly on
the command line (`explicit`) that contradicts DIR is a UserError naming both values.

`fit_params` fits the imported parameters to the run's model: the first seq_len rows of a
learned position table, and embedding (and head) rows for the tokens the run added, set to
the mean row of the pretrained ones.

`load_source` loads the model a command runs: a workdir of ours or an `hf:DIR` directory.
"""

from __future__ import annotations

import json
import os
import pickle

import ml_collections
import numpy as np

from zhgpt_jax import gpt_config
from zhgpt_jax import tokenizer as tok_lib
from zhgpt_jax.config import UserError
from zhgpt_jax.gpt_config import GPTConfig

# Parameter fields a run fits to itself rather than taking from DIR (`fit_params`).
FITTED = ('seq_len', 'real_vocab_size')


def shape_paths(cfg: GPTConfig) -> tuple[str, ...]:
  """The config.model keys init_from=hf:DIR takes from DIR (model `cfg`): every parameter
  field (gpt_config.param_paths) but the fitted ones and those of groups `cfg` does not use."""
  skip = set(FITTED) | set(gpt_config.inactive_paths(cfg))
  return tuple(p for p in gpt_config.param_paths() if p not in skip)


def hf_dir(config) -> str | None:
  return config.init_from[3:] if config.init_from.startswith('hf:') else None


def init_tokenizer_dir(config) -> str:
  """The tokenizer a run must use: config.tokenizer.path, else init_from's, else ''."""
  if config.tokenizer.path:
    return config.tokenizer.path
  if hf_dir(config) is not None:
    return hf_dir(config)
  if config.init_from:
    return os.path.join(config.init_from, 'tokenizer')
  return ''


def _set(config, dotted, value):
  *head, last = dotted.split('.')
  for part in head:
    config = config[part]
  config[last] = value


def _hf_config(directory: str, what: str) -> dict:
  path = os.path.join(directory, 'config.json')
  if not os.path.isfile(path):
    raise UserError(f'{what}: no HuggingFace model there ({path} does not exist)')
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'{what}: cannot read {path} ({type(e).__name__}: {e})') from None


# Fields of an HF config.json that hold a size (None where absent is allowed for some).
_HF_SIZES = ('n_embd', 'n_layer', 'n_head', 'n_positions', 'n_inner', 'vocab_size', 'hidden_size',
             'num_hidden_layers', 'num_attention_heads', 'num_key_value_heads',
             'intermediate_size', 'max_position_embeddings', 'moe_intermediate_size',
             'num_experts', 'num_experts_per_tok', 'decoder_sparse_step', 'head_dim')


def hf_model_config(directory: str, what: str) -> GPTConfig:
  """DIR's config.json as a GPTConfig; UserError naming a missing or wrong field as a field
  of DIR's config.json (`what`: how the message names DIR)."""
  from zhgpt_jax import export
  hf = _hf_config(directory, what)
  path = os.path.join(directory, 'config.json')
  if not isinstance(hf, dict):
    raise UserError(f'{what}: {path} is not a JSON object')
  for key in (k for k in _HF_SIZES if hf.get(k) is not None):
    if isinstance(hf[key], bool) or not isinstance(hf[key], int) or hf[key] < 1:
      raise UserError(f'{what}: {path} has {key}={hf[key]!r}; it must be a positive integer')
  try:
    return export.hf_config_to_ours(hf)
  except KeyError as e:
    raise UserError(f'{what}: {path} lacks the field {e}, which its architecture needs') from None
  except (TypeError, ValueError, AttributeError) as e:
    raise UserError(f'{what}: {path} has a field of the wrong type ({e})') from None


def _bin_shapes(path: str) -> dict[str, tuple[int, ...]]:
  """The tensor shapes of a pytorch_model.bin, memory-mapped (nothing read but the index);
  {} without torch (import_hf then says torch is needed)."""
  try:
    import torch
  except ImportError:
    return {}
  state = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
  return {k: tuple(v.shape) for k, v in state.items()}


def check_hf_dir(directory: str, what: str) -> GPTConfig:
  """DIR's GPTConfig, after checking each tensor's shape in its safetensors headers (nothing
  is loaded) against the shape its config.json implies; UserError naming the first mismatch."""
  from safetensors import SafetensorError, safe_open
  from zhgpt_jax import export
  cfg = hf_model_config(directory, what)
  arch = export.hf_architecture(cfg)
  path = os.path.join(directory, 'model.safetensors')
  index = os.path.join(directory, 'model.safetensors.index.json')
  got = {}
  try:
    if os.path.isfile(index) and not os.path.isfile(path):
      with open(index, encoding='utf-8') as f:
        names = sorted(set(json.load(f)['weight_map'].values()))
      files = [os.path.join(directory, n) for n in names]
    else:
      files = [path] if os.path.isfile(path) else []
    for path in files:
      with safe_open(path, framework='numpy') as f:
        got.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    if not files and os.path.isfile(os.path.join(directory, 'pytorch_model.bin')):
      path = os.path.join(directory, 'pytorch_model.bin')
      got = _bin_shapes(path)
  except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError,
          EOFError, pickle.UnpicklingError) as e:
    raise UserError(f'{what}: cannot read the weights in {path} ({type(e).__name__}: '
                    f'{" ".join(str(e).split())[:200]}); is the download complete?') from None
  if not got:
    return cfg
  got = export.with_prefix(got, arch)
  want = export.hf_shapes(cfg, arch)
  implied = (f'{os.path.join(directory, "config.json")} implies {{}} (d_model={cfg.d_model}, '
             f'n_layer={cfg.n_layer}, vocab_size={cfg.vocab_size}): the weights and their '
             'config.json disagree')
  for name, shape in got.items():
    if name in want and shape != want[name]:
      raise UserError(f'{what}: tensor {name} has shape {list(shape)}, but '
                      + implied.format(list(want[name])))
  missing = [hf for hf in export.row_names(cfg, arch) if hf not in got]
  if missing:
    raise UserError(f'{what}: the weights lack tensor {missing[0]}, but ' + implied.format(
        f'it ({len(missing)} tensors missing)'))
  return cfg


def _same_tokenizer(a: str, b: str) -> bool:
  return os.path.abspath(a) == os.path.abspath(b) or \
      tok_lib.tokenizer_hash(a) == tok_lib.tokenizer_hash(b)


def _resolve_tokenizer(c, source: str, what: str) -> None:
  if not os.path.isfile(tok_lib.json_path(source)):
    raise UserError(f'{what} has no tokenizer ({tok_lib.json_path(source)} does not exist): '
                    'save the tokenizer beside the model (tokenizer.save_pretrained(DIR))')
  if c.tokenizer.path and not _same_tokenizer(c.tokenizer.path, source):
    raise UserError(f'config.tokenizer.path={c.tokenizer.path!r} conflicts with {what}, whose '
                    'model was trained with its own tokenizer; leave tokenizer.path empty')
  c.tokenizer.path = c.tokenizer.path or source


def pretrained_shape(directory: str, task: str = 'pretrain') -> tuple[GPTConfig, dict, int]:
  """(DIR's GPTConfig, {config.model key: value} of its shape, its context length).

  The vocab_size value leaves room for the ChatML tokens when an SFT run will add them.
  """
  cfg = check_hf_dir(directory, f'init_from=hf:{directory}')
  shape = {key: gpt_config.get(cfg, key) for key in shape_paths(cfg)}
  tok = tok_lib.load_tokenizer(directory)
  if tok.get_vocab_size() > cfg.vocab_size:
    raise UserError(f'init_from=hf:{directory}: its tokenizer has {tok.get_vocab_size()} tokens '
                    f'but its model only {cfg.vocab_size} embedding rows')
  if task == 'sft':
    shape['vocab_size'] = max(cfg.vocab_size, tok_lib.chatml_vocab_size(directory))
  return cfg, shape, cfg.seq_len


def resolve(config, explicit=()) -> ml_collections.ConfigDict:
  """`config` with init_from's model shape and tokenizer (a copy; `config` is not changed).

  `explicit` holds the dotted keys set on the command line (e.g. 'model.n_layer'); one of
  them that contradicts DIR raises UserError. Resolving a resolved config changes nothing.
  """
  if not config.init_from:
    return config
  c = config.copy_and_resolve_references()
  directory = hf_dir(c)
  if directory is None:   # a workdir of ours: continued pretraining cuts shards with its tokenizer
    if c.task == 'pretrain':
      _resolve_tokenizer(c, os.path.join(c.init_from, 'tokenizer'), f'init_from={c.init_from}')
    return c
  what = f'init_from=hf:{directory}'
  _resolve_tokenizer(c, directory, what)
  _, shape, context = pretrained_shape(directory, c.task)
  for key, value in shape.items():
    key = f'model.{key}'
    current = gpt_config.get(c, key)
    if key == 'model.n_kv_head' and current == 0:
      current = gpt_config.get(c, 'model.n_head')   # 0 means n_head
    if key in explicit and current != value:
      raise UserError(f'--config.{key}={gpt_config.get(c, key)!r} contradicts {what}, whose '
                      f'config.json gives {key[6:]}={value!r}; drop the override (the '
                      'shape comes from the pretrained model)')
    _set(c, key, value)
  _check_derived(c, config, explicit, what)
  if c.model.seq_len > context:
    if 'model.seq_len' in explicit:
      raise UserError(f'--config.model.seq_len={c.model.seq_len} is longer than {what}\'s '
                      f'context ({context} positions)')
    print(f'model.seq_len: {c.model.seq_len} -> {context}, the context of {directory}')
    c.model.seq_len = context
  return c


def _check_derived(resolved, config, explicit, what: str) -> None:
  """mlp_ratio and vocab_multiple set on the command line must give DIR's widths."""
  from zhgpt_jax.model import model_config
  vocab = tok_lib.load_tokenizer(resolved.tokenizer.path).get_vocab_size()
  have = model_config(resolved.model, vocab)
  for key, field in gpt_config.DERIVES.items():
    if f'model.{key}' in explicit:
      m = resolved.model.copy_and_resolve_references()
      m[key], m[field] = config.model[key], 0
      got = getattr(model_config(m, vocab), field)
      if got != getattr(have, field):
        raise UserError(f'--config.model.{key}={config.model[key]!r} gives {field}={got}, which '
                        f'contradicts {what}, whose config.json gives {field}='
                        f'{getattr(have, field)}; drop the override')


def chatml_copy(tokenizer_dir: str, workdir: str) -> str:
  """workdir/tokenizer: a copy of `tokenizer_dir` given the ChatML tokens, for an SFT run."""
  dst = os.path.join(workdir, 'tokenizer')
  os.makedirs(workdir, exist_ok=True)
  tok_lib.copy_tokenizer(tokenizer_dir, dst)
  tok_lib.add_chatml(dst)
  print(f'tokenizer: added the ChatML tokens to a copy of {tokenizer_dir} in {dst}')
  return dst


def initial_params(config, cfg: GPTConfig, vocab: int) -> dict:
  """The params of config.init_from (hf:DIR, or a workdir of ours whose tokenizer has `vocab`
  tokens) fitted to the run's model `cfg`; UserError naming what differs beyond that."""
  src = config.init_from
  if hf_dir(config) is not None:
    from zhgpt_jax import export
    src_cfg, params = export.import_hf(src[3:])
    src_tokens = tok_lib.load_tokenizer(src[3:]).get_vocab_size()
  else:
    from zhgpt_jax import checkpoint
    from zhgpt_jax.model import model_config
    saved, params, _ = checkpoint.load_params(src)
    src_cfg = model_config(saved.model, vocab)
    src_tokens = src_cfg.real_vocab_size
  diff = compatible(src_cfg, cfg)
  if diff:
    raise UserError(f'init_from={src}: its model differs from config.model ({", ".join(diff)})')
  return fit_params(params, src_cfg, cfg, src_tokens)


def _mean_rows(table_VxD: np.ndarray, rows: int, real: int, new_ids: list[int]) -> np.ndarray:
  out = np.zeros((rows, table_VxD.shape[1]), np.float32)
  n = min(rows, table_VxD.shape[0])
  out[:n] = table_VxD[:n]
  out[new_ids] = table_VxD[:real].mean(axis=0)
  return out


def fit_params(params: dict, src: GPTConfig, cfg: GPTConfig, src_tokens: int) -> dict:
  """`params` of model `src` fitted to `cfg`: learned positions cut to cfg.seq_len, and the
  rows of token ids >= src_tokens (tokens the run added) set to the mean of the first
  src_tokens rows, in the embedding and in an untied head."""
  params = dict(params)
  new_ids = list(range(src_tokens, cfg.real_vocab_size))
  if cfg.position == 'learned' and cfg.seq_len < src.seq_len:
    params['wpe'] = {'embedding': np.asarray(params['wpe']['embedding'])[:cfg.seq_len]}
  if cfg.vocab_size != src.vocab_size or new_ids:
    wte = np.asarray(params['wte']['embedding'])
    params['wte'] = {'embedding': _mean_rows(wte, cfg.vocab_size, src_tokens, new_ids)}
    if 'lm_head' in params:
      head = np.asarray(params['lm_head'])
      params['lm_head'] = _mean_rows(head.T, cfg.vocab_size, src_tokens, new_ids).T
  return params


def compatible(src: GPTConfig, cfg: GPTConfig) -> list[str]:
  """The parameter fields in which pretrained model `src` differs from the run's `cfg` beyond
  what `fit_params` absorbs (and the fields of groups a dense `src` does not use)."""
  absorbed = {'real_vocab_size', *gpt_config.inactive_paths(src)}
  if cfg.seq_len <= src.seq_len:
    absorbed.add('seq_len')
  if cfg.vocab_size >= src.vocab_size:
    absorbed.add('vocab_size')
  get = gpt_config.get
  return [f'{p}: {get(src, p)!r} vs {get(cfg, p)!r}' for p in gpt_config.param_paths()
          if p not in absorbed and get(src, p) != get(cfg, p)]


def load_source(source: str, step: int | None = None):
  """(GPTConfig, params on the device, tokenizer, model id) of a workdir of ours or an
  `hf:DIR` directory: what `main.py serve` and `main.py eval --tasks` run."""
  import jax
  import jax.numpy as jnp
  if source.startswith('hf:'):
    from zhgpt_jax import export
    path = source[3:]
    check_hf_dir(path, f'--workdir {source}')   # before loading anything
    cfg, params = export.import_hf(path)
    tokenizer = tok_lib.load_tokenizer(path)
  else:
    from zhgpt_jax import checkpoint
    cfg, params, tokenizer, _, _ = checkpoint.load_model(source, step)
  model_id = os.path.basename(os.path.normpath(source.removeprefix('hf:'))) or 'zhgpt'
  return cfg, jax.tree.map(jnp.asarray, params), tokenizer, model_id
