"""The model's one schema: `GPTConfig`, every model field declared once, with its default,
its kind and its allowed values.

Everything else follows from it by name: `config.model` (its defaults and command-line keys,
`default_config`), the checks of `config.validate` (`CHOICES`, `BOUNDS`, `problems`),
`model.model_config` (a config.model -> GPTConfig, key for key), what resume and init_from
compare (`param_paths`), what `init_from=hf:DIR` writes into config.model, and the
"zhgpt_jax" block of an HF export's config.json. A config key is the field's path:
`--config.model.moe.n_routed` is `GPTConfig.moe.n_routed`. No JAX here: prepare imports it.

Adding a model field (e.g. a new norm or MLP switch):
  1. declare it below with `knob(default, kind, choices=..., bound=...)` and a comment, in
     GPTConfig or in its group (MoEConfig); a rule between fields goes in `problems`;
  2. read it in model.py as `cfg.<name>` (`cfg.moe.<name>` in a group);
  3. add a case to tests/test_model.py's VARIANTS.
  If a HuggingFace class should carry it, that class's entry in hf_classes.py maps it.
Adding a group of fields (as `moe`): a frozen dataclass of knobs, and a field of GPTConfig
made with `group(TheClass, active=...)`; `active(cfg)` says when its fields shape anything
(a dense model's `moe.*` decide nothing, so init_from and resume ignore them there).

Kinds: PARAM fields decide the parameters (their shapes and meaning): resume and init_from
compare them, and init_from=hf:DIR takes them from DIR. COMPUTE fields change how a step
computes (kernels, precision, memory, dropout, loss weights): a checkpoint does not fix them.
DERIVE fields are only rules for a PARAM field's 0 (mlp_ratio for mlp_hidden): once that
field is set they decide nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

PARAM, COMPUTE, DERIVE = 'param', 'compute', 'derive'


def knob(default, kind: str = PARAM, choices: tuple = (), bound: str = '', config: bool = True,
         derives: str = ''):
  """A model field. `bound`: '>0', '>=0' or '[0,1)'; `config=False`: no config.model key
  (the field is set from elsewhere, e.g. the tokenizer); a DERIVE field names the field whose
  0 it decides (`derives`)."""
  return dataclasses.field(default=default, metadata=dict(
      kind=kind, choices=choices, bound=bound, config=config, derives=derives))


def group(cls, active: Callable[[Any], bool]):
  """A group of fields (config.model.<name>.*); `active(cfg)` says when they shape anything."""
  return dataclasses.field(default_factory=cls, metadata=dict(group=cls, active=active))


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """DeepSeekMoE-style experts (model.mlp='moe')."""
  n_routed: int = knob(8, bound='>0')            # fine-grained routed experts
  n_shared: int = knob(1, bound='>=0')           # always-on shared experts
  top_k: int = knob(2, bound='>0')
  gate: str = knob('softmax', choices=('softmax', 'sigmoid'))
  expert_hidden: int = knob(0, bound='>=0')      # 0 = mlp hidden / top_k (rounded up to 64)
  every: int = knob(1, bound='>0')               # every k-th layer is MoE (others dense)
  shared_gate: bool = knob(False)                # shared experts scaled by sigmoid(x · w) (Qwen2-MoE)
  first_dense: int = knob(0, bound='>=0')        # the first k layers keep a dense MLP (DeepSeekMoE: 1)
  # 'sparse': each expert runs on its own tokens (FLOPs follow top_k); 'dense': every expert
  # on every token (the exact reference; cost grows with n_routed).
  dispatch: str = knob('sparse', COMPUTE, choices=('sparse', 'dense'))
  # How sparse runs its expert groups: 'capacity' ([E, C, d] blocks; drops past C),
  # 'ragged_dot' (jax.lax.ragged_dot; never drops), 'auto' (capacity on CPU, else
  # ragged_dot; bench/moe.py measures both). Expert parallelism uses capacity.
  grouped: str = knob('auto', COMPUTE, choices=('auto', 'capacity', 'ragged_dot'))
  # rows per expert = factor x tokens·top_k/n_routed (0: never drop)
  capacity_factor: float = knob(2.0, COMPUTE, bound='>=0')
  # 'aux': the balance loss (aux_weight); 'bias': DeepSeek-V3's auxiliary-loss-free
  # per-expert routing bias (a parameter), moved by ±bias_rate toward equal load every step.
  balance: str = knob('aux', choices=('aux', 'bias'))
  bias_rate: float = knob(0.001, COMPUTE, bound='>=0')
  aux_weight: float = knob(0.01, COMPUTE, bound='>=0')   # load-balancing loss weight (balance='aux')
  z_weight: float = knob(0.001, COMPUTE, bound='>=0')    # router z-loss weight
  # DeepSeek-V3's router: the chosen k sigmoid gates renormalised to sum 1 (norm_topk_prob),
  # the routed experts' gates scaled (routed_scaling_factor), and a token's k chosen among the
  # experts of its topk_group best of n_group groups only (a group scores its best two).
  norm_topk: bool = knob(True)                   # gate='sigmoid' only
  routed_scale: float = knob(1.0, bound='>0')
  n_group: int = knob(1, bound='>0')
  topk_group: int = knob(1, bound='>0')


@dataclasses.dataclass(frozen=True)
class MLAConfig:
  """DeepSeek-V2/V3's multi-head latent attention (attention_kind='mla'; attention.py). The KV
  cache holds kv_lora_rank + qk_rope_head_dim numbers a token a layer."""
  q_lora_rank: int = knob(0, bound='>=0')        # the query's own latent width (0 = from x directly)
  kv_lora_rank: int = knob(64, bound='>0')       # the key/value latent width (what the cache holds)
  qk_nope_head_dim: int = knob(32, bound='>=0')  # a head's query/key width without position
  qk_rope_head_dim: int = knob(16, bound='>0')   # rotary query/key width (one rotary key for all heads)
  v_head_dim: int = knob(32, bound='>0')         # a head's value width


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """Everything the model is; `model.model_config` builds it from config.model and the tokenizer."""
  n_layer: int = knob(12, bound='>0')
  n_head: int = knob(12, bound='>0')
  d_model: int = knob(768, bound='>0')
  n_kv_head: int = knob(0, bound='>=0')          # 0 = n_head (grouped-query attention when smaller)
  seq_len: int = knob(1024, bound='>0')          # context length the model is built for
  # pad the tokenizer's vocab up to this multiple (when vocab_size is 0)
  vocab_multiple: int = knob(128, DERIVE, bound='>0', derives='vocab_size')
  vocab_size: int = knob(0, bound='>=0')         # embedding rows; 0 = the tokenizer's vocab padded
  dropout: float = knob(0.0, COMPUTE, bound='[0,1)')
  bias: bool = knob(True)
  qkv_bias: bool = knob(False)                   # q/k/v projections have biases even when bias=False (Qwen2)
  position: str = knob('learned', choices=('learned', 'rope'))
  rope_theta: float = knob(10000.0)
  # 'gelu' (GPT-2) | 'relu2' (ReLU squared: Primer) | 'swiglu' (Llama) | 'moe' (MoEConfig)
  mlp: str = knob('gelu', choices=('gelu', 'relu2', 'swiglu', 'moe'))
  # hidden = ratio * d_model (swiglu: 2/3 of that, rounded up to 64), when mlp_hidden is 0
  mlp_ratio: float = knob(4.0, DERIVE, derives='mlp_hidden')
  mlp_hidden: int = knob(0, bound='>=0')         # the MLP's hidden width; 0 = from mlp_ratio
  norm: str = knob('layernorm', choices=('layernorm', 'rmsnorm'))
  norm_eps: float = knob(1e-5)
  # RMSNorm of each head's query and key over the head width (one learned scale [H] each,
  # shared by the heads) before RoPE: Qwen3's q_norm/k_norm, modded-nanogpt's QK-norm. It
  # bounds the attention logits; the KV cache holds normed keys. 'mha' attention only.
  qk_norm: bool = knob(False)
  # logits = cap · tanh(logits / cap) wherever the head is applied (loss, sampling, scoring;
  # Gemma 2, modded-nanogpt); 0 = off.
  logit_softcap: float = knob(0.0, bound='>=0')
  tie_embeddings: bool = knob(True)
  # jax.nn.dot_product_attention's implementation ('cudnn' needs a GPU: elsewhere it runs xla)
  attention: str = knob('xla', COMPUTE, choices=('xla', 'cudnn'))
  dtype: str = knob('float32', COMPUTE, choices=('float32', 'bfloat16'))  # compute; params stay float32
  remat: str = knob('none', COMPUTE, choices=('none', 'block'))
  # Init std of the residual output projections, as a multiple of GPT-2's
  # 0.02/sqrt(2·n_layer); 0 starts each block as the identity.
  residual_init: float = knob(1.0, COMPUTE, bound='>=0')
  moe: MoEConfig = group(MoEConfig, active=lambda cfg: cfg.mlp == 'moe')
  # 'mha': multi-head attention (grouped-query when n_kv_head < n_head); 'mla': DeepSeek's
  # multi-head latent attention, shaped by `mla`.
  attention_kind: str = knob('mha', choices=('mha', 'mla'))
  mla: MLAConfig = group(MLAConfig, active=lambda cfg: cfg.attention_kind == 'mla')
  # The tokenizer's tokens (ids >= this never occur in data): set from the tokenizer.
  real_vocab_size: int = knob(0, config=False)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_head

  def is_moe_layer(self, i: int) -> bool:
    return (self.mlp == 'moe' and i >= self.moe.first_dense
            and (i + 1 - self.moe.first_dense) % self.moe.every == 0)

  def moe_layers(self) -> list[int]:
    return [i for i in range(self.n_layer) if self.is_moe_layer(i)]


def fields(cls=GPTConfig, prefix: str = '') -> Iterator[tuple[str, dataclasses.Field]]:
  """(dotted path, field) of every leaf field, groups entered ('moe.n_routed')."""
  for f in dataclasses.fields(cls):
    if 'group' in f.metadata:
      yield from fields(f.metadata['group'], f'{prefix}{f.name}.')
    else:
      yield prefix + f.name, f


def groups(cls=GPTConfig) -> dict[str, dataclasses.Field]:
  return {f.name: f for f in dataclasses.fields(cls) if 'group' in f.metadata}


def param_paths() -> tuple[str, ...]:
  """The fields that decide what the parameters are: a checkpoint's params fit another model
  only where these agree (resume, init_from, an imported HF model)."""
  return tuple(p for p, f in fields() if f.metadata['kind'] == PARAM)


def inactive_paths(cfg: GPTConfig) -> tuple[str, ...]:
  """The fields of groups that shape nothing in `cfg` (a dense model's moe.*)."""
  return tuple(p for name, g in groups().items() if not g.metadata['active'](cfg)
               for p, _ in fields(g.metadata['group'], f'{name}.'))


def get(obj, path: str):
  """The value at a dotted path of a GPTConfig, ConfigDict or dict."""
  for part in path.split('.'):
    obj = obj[part] if isinstance(obj, dict) or hasattr(obj, 'keys') else getattr(obj, part)
  return obj


def to_flat(cfg: GPTConfig) -> dict[str, Any]:
  """{dotted path: value} of every field."""
  return {p: get(cfg, p) for p, _ in fields()}


def from_flat(values: dict[str, Any], cls=GPTConfig, prefix: str = ''):
  """A GPTConfig from {dotted path: value}; absent fields keep their defaults, unknown keys
  are ignored (a newer or older file's extras)."""
  kw = {}
  for f in dataclasses.fields(cls):
    if 'group' in f.metadata:
      kw[f.name] = from_flat(values, f.metadata['group'], f'{prefix}{f.name}.')
    elif prefix + f.name in values:
      kw[f.name] = values[prefix + f.name]
  return cls(**kw)


def flatten(nested, prefix: str = '') -> dict[str, Any]:
  """{dotted path: value} of a nested dict or ConfigDict."""
  out = {}
  for key, value in nested.items():
    if isinstance(value, dict) or hasattr(value, 'keys'):
      out.update(flatten(value, f'{prefix}{key}.'))
    else:
      out[prefix + key] = value
  return out


def config_defaults(**values) -> dict:
  """config.model's keys and default values (nested, groups as dicts), `values` applied."""
  cfg = from_flat(values)
  out: dict = {}
  for path, f in fields():
    if f.metadata['config']:
      *head, last = path.split('.')
      node = out
      for part in head:
        node = node.setdefault(part, {})
      node[last] = get(cfg, path)
  return out


DERIVES = {p: f.metadata['derives'] for p, f in fields() if f.metadata['derives']}
CHOICES = {f'model.{p}': f.metadata['choices'] for p, f in fields() if f.metadata['choices']}
BOUNDS = {f'model.{p}': f.metadata['bound'] for p, f in fields() if f.metadata['bound']}


def problems(m) -> Iterator[tuple[str, str]]:
  """(key, what is wrong) for each rule between config.model's fields that `m` breaks."""
  if m.d_model % m.n_head:
    yield 'model.d_model', f'must be divisible by model.n_head={m.n_head}'
  n_kv = m.n_kv_head or m.n_head
  if m.n_head % n_kv:
    yield 'model.n_kv_head', f'must divide model.n_head={m.n_head}'
  if m.position == 'rope' and (m.d_model // m.n_head) % 2:
    yield 'model.d_model', 'rope needs an even head dimension'
  if m.mlp == 'moe' and m.moe.top_k > m.moe.n_routed:
    yield 'model.moe.top_k', f'must be <= model.moe.n_routed={m.moe.n_routed}'
  if m.mlp == 'moe' and not 0 <= m.moe.first_dense < m.n_layer:
    yield 'model.moe.first_dense', f'must be in [0, model.n_layer={m.n_layer})'
  if m.attention == 'cudnn' and m.dtype != 'bfloat16':
    yield 'model.attention', 'cudnn attention needs model.dtype=bfloat16'
  e, groups = m.moe.n_routed, m.moe.n_group
  if m.mlp == 'moe' and e % groups:
    yield 'model.moe.n_group', f'must divide model.moe.n_routed={e}'
  elif m.mlp == 'moe' and groups > 1 and e // groups < 2:
    yield 'model.moe.n_group', 'needs at least 2 experts a group (a group scores its best two)'
  elif m.mlp == 'moe' and m.moe.topk_group > groups:
    yield 'model.moe.topk_group', f'must be <= model.moe.n_group={groups}'
  elif m.mlp == 'moe' and m.moe.top_k > m.moe.topk_group * (e // groups):
    yield 'model.moe.top_k', 'must be <= the experts of topk_group groups'
  if m.attention_kind == 'mla':
    if m.mla.qk_rope_head_dim % 2:
      yield 'model.mla.qk_rope_head_dim', 'rope needs an even width'
    if m.position != 'rope':
      yield 'model.position', "MLA's decoupled keys are rotary: needs model.position=rope"
    if m.n_kv_head not in (0, m.n_head):
      yield 'model.n_kv_head', 'MLA has no key/value head groups: leave it 0 (= n_head)'
    if m.qk_norm:
      yield 'model.qk_norm', 'not for MLA (its latents are RMS-normed already): leave it false'
