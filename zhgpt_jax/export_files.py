"""What an export writes beside the weights: the tokenizer files with their chat template,
generation_config.json, and the model card README.md; and where an export may write
(`refuse_run_target`: never over a run), for every export format.

Pure functions of the model config, the tokenizer directory and what the run recorded; export.py
calls them while it fills its temporary directory.
"""

from __future__ import annotations

import json
import os
import shutil

from zhgpt_jax import __version__
from zhgpt_jax import tokenizer as tokenizer_lib
from zhgpt_jax.config import UserError
from zhgpt_jax.model import GPTConfig

# What `transformers_version` says when transformers is not installed: the version the
# export was last verified against (tests/test_pretrained.py loads every export).
VERIFIED_TRANSFORMERS = '5.24.0'


def transformers_version() -> str:
  try:
    from importlib import metadata
    return metadata.version('transformers')
  except Exception:  # pylint: disable=broad-except  (not installed: export needs no torch)
    return VERIFIED_TRANSFORMERS


def refuse_run_target(target: str, workdir: str | None = None, walk: bool = False) -> None:
  """Raises UserError when writing over `target` could lose a run: it is, holds or is inside
  `workdir`, or it or a directory above it holds checkpoints/ (with `walk`, also below it)."""
  out = os.path.realpath(target)
  if workdir is not None:
    src = os.path.realpath(workdir)
    if out == src or out.startswith(src + os.sep) or src.startswith(out.rstrip(os.sep) + os.sep):
      raise UserError(f'export target {target} is, contains or is inside the workdir '
                      f'{workdir}; choose a directory outside it')
  path = out
  while True:
    if os.path.isdir(os.path.join(path, 'checkpoints')):
      raise UserError(f'export target {target} is or is inside the workdir {path} (it holds '
                      'checkpoints); choose a directory outside it')
    if os.path.dirname(path) == path:
      break
    path = os.path.dirname(path)
  for d, dirs, _ in os.walk(out) if walk else ():
    if 'checkpoints' in dirs:
      raise UserError(f'export target {target} holds a run ({os.path.join(d, "checkpoints")}); '
                      'not replacing it')


def special_ids(tokenizer_dir: str | None, cfg: GPTConfig) -> tuple[dict, tuple[int, ...]]:
  """(bos/eos/pad ids for config.json, the ids generation stops at), from the tokenizer."""
  ids = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
  if tokenizer_dir is None:
    return ids, ()
  tok = tokenizer_lib.load_tokenizer(tokenizer_dir)
  if tok.get_vocab_size() != cfg.real_vocab_size:
    raise UserError(f'tokenizer {tokenizer_dir} has {tok.get_vocab_size()} tokens but the model '
                    f'was built for {cfg.real_vocab_size}: wrong tokenizer directory?')
  s = tokenizer_lib.special_ids(tok)
  return dict(bos_token_id=s.eos if s.bos is None else s.bos, eos_token_id=s.eos,
              pad_token_id=s.pad), s.stop


def generation_config(cfg: GPTConfig, ids: dict, stop: tuple[int, ...], sample_cfg=None) -> dict:
  """generation_config.json: stop at end of text and <|im_end|>, our sampling defaults."""
  out = dict(ids, transformers_version=transformers_version())
  if len(stop) > 1:
    out['eos_token_id'] = list(stop)
  if sample_cfg is not None:
    out.update(do_sample=sample_cfg.temperature > 0, temperature=sample_cfg.temperature,
               top_k=sample_cfg.top_k, top_p=sample_cfg.top_p,
               repetition_penalty=sample_cfg.repetition_penalty)
  # Padding ids never occur in data; like our sampler, HF's generate must never pick them.
  pad_ids = list(range(cfg.real_vocab_size, cfg.vocab_size))
  if pad_ids:
    out['suppress_tokens'] = pad_ids
  return out


def _read(path: str) -> str | None:
  try:
    with open(path, encoding='utf-8') as f:
      return f.read()
  except FileNotFoundError:
    return None


def chat_template(tokenizer_dir: str) -> str | None:
  """The chat template of a tokenizer directory (chat_template.jinja, else tokenizer_config.json's),
  or ours when the tokenizer has the ChatML tokens and no template of its own; None otherwise."""
  config = json.loads(_read(os.path.join(tokenizer_dir, 'tokenizer_config.json')) or '{}')
  template = _read(os.path.join(tokenizer_dir, 'chat_template.jinja')) or config.get('chat_template')
  if template is None and tokenizer_lib.has_chatml(tokenizer_lib.load_tokenizer(tokenizer_dir)):
    template = tokenizer_lib.CHAT_TEMPLATE
  return template


def copy_tokenizer_files(tokenizer_dir: str, out_dir: str) -> None:
  """The tokenizer files, with the chat template in tokenizer_config.json and in
  chat_template.jinja (transformers 4 reads the one, 5 the other)."""
  for name in tokenizer_lib.TOKENIZER_FILES:
    if os.path.isfile(os.path.join(tokenizer_dir, name)):
      shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(out_dir, name))
  template = chat_template(tokenizer_dir)
  if template is None:
    return
  config_path = os.path.join(out_dir, 'tokenizer_config.json')
  config = json.loads(_read(config_path) or '{}')
  config['chat_template'] = template
  with open(config_path, 'w', encoding='utf-8') as f:
    json.dump(config, f, ensure_ascii=False, indent=2)
  with open(os.path.join(out_dir, 'chat_template.jinja'), 'w', encoding='utf-8') as f:
    f.write(template)


def shape_text(cfg: GPTConfig) -> str:
  """The model's shape in one line (layers, widths, heads, MLP, norm, positions, ...)."""
  parts = [f'{cfg.n_layer} layers', f'd_model {cfg.d_model}',
           f'{cfg.n_head} heads' + (f' ({cfg.n_kv_head} key/value)' if cfg.n_kv_head != cfg.n_head
                                    else ''),
           f'MLP {cfg.mlp} {cfg.mlp_hidden}', f'{cfg.norm}', f'positions {cfg.position}',
           f'context {cfg.seq_len}', 'tied embeddings' if cfg.tie_embeddings else 'untied head']
  if cfg.mlp == 'moe':
    parts.append(f'{cfg.moe.n_routed} routed experts (top {cfg.moe.top_k}) of width '
                 f'{cfg.moe.expert_hidden}, {cfg.moe.n_shared} shared, every {cfg.moe.every} layer(s)')
  return ', '.join(parts)


def model_card(cfg: GPTConfig, arch: str, n_params: int, tokenizer_dir: str | None,
               run: dict | None) -> str:
  """README.md of an export. `run` (from export_workdir): config, step, val metrics."""
  lines = ['---', 'library_name: transformers', 'pipeline_tag: text-generation',
           'tags: [zhgpt-jax]', '---', '', '# zhgpt-jax export', '',
           f'A `{arch}` exported by zhgpt-jax {__version__}: {n_params:,} parameters, float32.', '',
           f'- Architecture: {shape_text(cfg)}.']
  if tokenizer_dir is not None:
    tok = tokenizer_lib.load_tokenizer(tokenizer_dir)
    s = tokenizer_lib.special_ids(tok)
    lines.append(f'- Tokenizer: {tok.get_vocab_size():,} tokens ({type(tok.model).__name__}), '
                 f'end of text {tok.id_to_token(s.eos)!r}'
                 + (', ChatML chat template' if s.im_end is not None else '') + '.')
  if run:
    c, step, val = run['config'], run['step'], run.get('val') or {}
    data = c['sft']['data'] if c['task'] == 'sft' else c['data']['corpus']
    start = c.get('init_from') or 'random initialisation'
    lines += [f"- Training: task {c['task']}, data `{data}`, from {start}, {step:,} steps of "
              f"{c['train']['per_device_batch']} x {c['model']['seq_len']} tokens per device.",
              '- Validation: ' + (', '.join(f'{k} {val[k]:.4f}' for k in ('loss', 'bpc', 'accuracy')
                                          if k in val) or 'not evaluated at this step') + '.']
  lines += ['', '## How to load', '', '```python',
            'from transformers import AutoModelForCausalLM, AutoTokenizer',
            "tok = AutoTokenizer.from_pretrained('PATH')",
            "model = AutoModelForCausalLM.from_pretrained('PATH')",
            "ids = tok('村民们都很高兴', return_tensors='pt').input_ids",
            'print(tok.decode(model.generate(ids, max_new_tokens=50)[0]))',
            '```', '',
            'generation_config.json holds the sampling settings the run used; pass '
            '`do_sample=False` for greedy decoding.', '',
            '## Limitations', '',
            'A research model trained on a small corpus: it makes up facts, repeats itself and '
            'carries the biases of its data. It has no safety tuning; do not use its output '
            'unreviewed.', '']
  return '\n'.join(lines)


def ordinary_permissions(directory: str) -> None:
  """Directories 0755 and files 0644, less the umask (mkdtemp makes 0700)."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(directory, 0o755 & ~umask)
  for root, dirs, files in os.walk(directory):
    for d in dirs:
      os.chmod(os.path.join(root, d), 0o755 & ~umask)
    for f in files:
      os.chmod(os.path.join(root, f), 0o644 & ~umask)
