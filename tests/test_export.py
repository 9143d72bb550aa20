"""export.py: HF logits and greedy parity, exact round trips, refusals, directory rules."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from helpers import tiny_cfg
from zhgpt_jax import export as E
from zhgpt_jax import model as M
from zhgpt_jax import tokenizer as T
from zhgpt_jax.config import UserError

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

TEXTS = ['村民们都很高兴，今天的天气很好。',
         '我们一起去北京看看长城吧！',
         '中国人民在春节的时候回家团聚。',
         '他说：“这本书很有意思，我看了三遍。”',
         '小明喜欢在公园里跑步和读书。'] * 3

ROPE = dict(position='rope', norm='rmsnorm', bias=False)
MLA = dict(q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
           v_head_dim=24)
DEEPSEEK_MOE = dict(n_routed=8, top_k=2, gate='sigmoid', balance='bias', routed_scale=2.5,
                    n_group=2, topk_group=1, first_dense=1, capacity_factor=0)
VARIANTS = {
    'gpt2_untied': (dict(tie_embeddings=False), 'GPT2LMHeadModel'),
    'llama_untied': (dict(ROPE, mlp='swiglu', n_kv_head=2, tie_embeddings=False),
                     'LlamaForCausalLM'),
    'llama_tied': (dict(ROPE, mlp='swiglu', n_kv_head=2), 'LlamaForCausalLM'),
    'llama_bias': (dict(ROPE, mlp='swiglu', bias=True), 'LlamaForCausalLM'),
    'qwen2_tied': (dict(ROPE, mlp='swiglu', n_kv_head=2, qkv_bias=True), 'Qwen2ForCausalLM'),
    'qwen2_untied': (dict(ROPE, mlp='swiglu', qkv_bias=True, tie_embeddings=False),
                     'Qwen2ForCausalLM'),
    'qwen3_qk_norm': (dict(ROPE, mlp='swiglu', n_kv_head=2, qk_norm=True), 'Qwen3ForCausalLM'),
    'moe_shared1': (dict(ROPE, mlp='moe', moe=dict(n_routed=4, top_k=2, n_shared=1)),
                    'Qwen2MoeForCausalLM'),
    'moe_shared2_every2': (dict(ROPE, mlp='moe', n_kv_head=2, tie_embeddings=False,
                                moe=dict(n_routed=4, top_k=2, n_shared=2, every=2)),
                           'Qwen2MoeForCausalLM'),
    'moe_gate_qkv_bias': (dict(ROPE, mlp='moe', qkv_bias=True,
                               moe=dict(n_routed=4, top_k=2, n_shared=1, shared_gate=True)),
                          'Qwen2MoeForCausalLM'),
    # Layer 0 dense, layer 1 MoE (DeepSeekMoE's first_dense): Qwen2-MoE's mlp_only_layers.
    'moe_shared0_first_dense': (dict(ROPE, mlp='moe', moe=dict(n_routed=4, top_k=2, n_shared=0,
                                                               first_dense=1)),
                                'Qwen2MoeForCausalLM'),
    # DeepSeek-V3: MLA with a query latent; 3 layers, the first dense; the sigmoid router with
    # its bias, scaled gates and 2 groups (capacity 0: HF never drops a token either).
    'deepseek_v3': (dict(ROPE, mlp='moe', n_layer=3, attention_kind='mla', mla=MLA,
                         moe=dict(DEEPSEEK_MOE, n_shared=1)), 'DeepseekV3ForCausalLM'),
    # MLA without a query latent over dense SwiGLU layers: first_k_dense_replace = n_layer.
    'deepseek_v3_dense': (dict(ROPE, mlp='swiglu', attention_kind='mla',
                               mla=dict(MLA, q_lora_rank=0)), 'DeepseekV3ForCausalLM'),
    # The same router over GQA with q/k/v biases, balanced by the aux loss (zero bias),
    # gates not renormalised, no shared expert: Glm4-MoE.
    'glm4_moe': (dict(ROPE, mlp='moe', n_kv_head=2, qkv_bias=True, tie_embeddings=False,
                      moe=dict(DEEPSEEK_MOE, balance='aux', norm_topk=False, n_shared=0)),
                 'Glm4MoeForCausalLM'),
}


def random_params(cfg, seed=0):
  # At init the blocks barely touch the residual stream: a parity test would not see them
  # and greedy decoding repeats one token. Noise of 0.3 everywhere makes every tensor matter
  # (and numpy draws it without compiling the init).
  rng = np.random.RandomState(seed)

  def draw(path, leaf):
    x = 0.3 * rng.standard_normal(leaf.shape).astype(np.float32)
    return x + 1 if path[-1].key == 'scale' else x

  shapes = jax.eval_shape(lambda: M.init_params(cfg, jax.random.PRNGKey(0)))
  return jax.tree_util.tree_map_with_path(draw, shapes)


def forward(cfg):
  return jax.jit(lambda params, tokens_BxL: M.GPT(cfg).apply({'params': params}, tokens_BxL)[0])


def our_logits(cfg, params, tokens_BxL):
  return np.asarray(forward(cfg)(params, tokens_BxL))


def load_hf(path, arch):
  model = transformers.AutoModelForCausalLM.from_pretrained(path)
  assert type(model).__name__ == arch
  return model.float().eval()


def hf_logits(model, tokens_BxL):
  with torch.no_grad():
    return model(torch.tensor(tokens_BxL)).logits.numpy()


def assert_params_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.shape == y.shape and np.array_equal(np.asarray(x), np.asarray(y))


def tokens(cfg, shape, seed=0):
  return np.random.RandomState(seed).randint(0, cfg.real_vocab_size, shape)


@pytest.fixture(scope='module')
def tok_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tok'))
  T.save_tokenizer(T.train_tokenizer(TEXTS, vocab_size=300, min_frequency=1), path)
  return path


@pytest.fixture(scope='module')
def gpt2(tok_dir, tmp_path_factory):
  vocab = T.load_tokenizer(tok_dir).get_vocab_size()
  cfg = tiny_cfg(vocab, vocab_multiple=64)
  params = random_params(cfg)
  out = E.export_hf(cfg, params, str(tmp_path_factory.mktemp('gpt2') / 'hf'), tok_dir)
  return cfg, params, out


def greedy(cfg, params, prompt_BxP, n):
  """Reference greedy decoding: full logits recomputed every step, no cache, no padding ids."""
  fwd = forward(cfg)
  b, p = prompt_BxP.shape
  buf_BxT = np.zeros((b, cfg.seq_len), np.int32)   # causal: the zeros after p+i are not seen
  buf_BxT[:, :p] = prompt_BxP
  for i in range(n):
    logits_BxV = np.asarray(fwd(params, buf_BxT)[:, p + i - 1])
    buf_BxT[:, p + i] = np.argmax(logits_BxV[:, :cfg.real_vocab_size], -1)
  return buf_BxT[:, p:p + n]


def test_gpt2_logits_and_greedy_match_hf(gpt2):
  cfg, params, out = gpt2
  assert cfg.vocab_size == 320 and cfg.real_vocab_size < 320
  model = load_hf(out, 'GPT2LMHeadModel')
  x = tokens(cfg, (2, 48))
  np.testing.assert_allclose(hf_logits(model, x), our_logits(cfg, params, x), atol=1e-4, rtol=0)

  prompt = tokens(cfg, (2, 8), seed=1)
  ours = greedy(cfg, params, prompt, 32)
  theirs = model.generate(torch.tensor(prompt), attention_mask=torch.ones(prompt.shape, dtype=int),
                          do_sample=False, max_new_tokens=32, eos_token_id=None,
                          use_cache=True).numpy()[:, 8:]
  assert theirs.shape == (2, 32) and len(set(ours.ravel())) > 8   # not one repeated token
  np.testing.assert_array_equal(theirs, ours)


def test_gpt2_import_round_trip_is_exact(gpt2):
  cfg, params, out = gpt2
  cfg2, params2 = E.import_hf(out)
  assert cfg2 == cfg
  assert_params_equal(params2, params)
  with open(os.path.join(out, 'config.json')) as f:   # llama.cpp's converter reads n_ctx
    c = json.load(f)
  assert c['n_ctx'] == c['n_positions'] == cfg.seq_len


def test_tokenizer_and_special_ids_exported(gpt2, tok_dir):
  _, _, out = gpt2
  ours = T.load_tokenizer(tok_dir)
  eot, pad = ours.token_to_id('<|endoftext|>'), ours.token_to_id('<|pad|>')
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  text = '村民们都很高兴，我们一起去北京。'
  ids = hf_tok(text)['input_ids']
  assert ids == ours.encode(text).ids and hf_tok.decode(ids) == text
  assert (hf_tok.eos_token_id, hf_tok.pad_token_id) == (eot, pad)
  im_end = ours.token_to_id('<|im_end|>')
  for name, eos in (('config.json', eot), ('generation_config.json', [eot, im_end])):
    with open(os.path.join(out, name)) as f:
      c = json.load(f)
    assert (c['bos_token_id'], c['eos_token_id'], c['pad_token_id']) == (eot, eos, pad)
  assert c['suppress_tokens'] == list(range(ours.get_vocab_size(), 320))   # vocab padding


@pytest.mark.filterwarnings('ignore:Initializing zero-element tensors')  # width-0 shared expert
@pytest.mark.parametrize('variant', VARIANTS)
def test_variant_matches_hf_and_round_trips(variant, tmp_path):
  overrides, arch = VARIANTS[variant]
  cfg = tiny_cfg(**dict(overrides))
  params = random_params(cfg)
  out = E.export_hf(cfg, params, str(tmp_path / 'hf'))
  model = load_hf(out, arch)
  x = tokens(cfg, (2, 48))
  np.testing.assert_allclose(hf_logits(model, x), our_logits(cfg, params, x), atol=1e-4, rtol=0)
  cfg2, params2 = E.import_hf(out)
  assert cfg2 == cfg
  assert_params_equal(params2, params)
  if cfg.mlp == 'moe':
    # What transformers itself writes imports too: per-expert tensors and the fused layout.
    for original in (True, False):
      again = str(tmp_path / f'saved_{original}')
      model.save_pretrained(again, save_original_format=original)
      cfg3, params3 = E.import_hf(again)
      assert cfg3 == cfg
      assert_params_equal(params3, params)


@pytest.mark.parametrize('overrides, fields', [
    (dict(ROPE, mlp='moe', moe=dict(n_routed=4, gate='sigmoid', balance='bias', every=2)),
     ['moe.every']),                                                # Glm4-MoE: MoE every layer
    (dict(ROPE, mlp='moe', attention_kind='mla', moe=dict(n_routed=4)), ['moe.gate']),
    (dict(ROPE, mlp='gelu', attention_kind='mla'), ['mlp']),        # MLA + GELU
    (dict(position='rope'), ['position']),                          # rope + gelu
    (dict(mlp='swiglu', norm='rmsnorm', bias=False), ['position']),  # learned + swiglu
    (dict(position='rope', mlp='swiglu', bias=True), ['norm']),     # LayerNorm with biases
    (dict(n_kv_head=2), ['n_kv_head']),                             # GPT-2 with GQA
    (dict(bias=False), ['bias']),
    (dict(qk_norm=True), ['qk_norm']),                              # GPT-2 with QK-norm
    (dict(ROPE, mlp='swiglu', qk_norm=True, qkv_bias=True), ['qk_norm']),  # Qwen2 ~ Qwen3
    (dict(ROPE, mlp='swiglu', logit_softcap=30.0), ['logit_softcap']),
])
def test_unmapped_variants_refused(overrides, fields, tmp_path):
  with pytest.raises(UserError, match='no stock HuggingFace class') as e:
    E.export_hf(tiny_cfg(**dict(overrides)), None, str(tmp_path / 'hf'))
  assert all(f'{f}=' in str(e.value) for f in fields)
  assert os.listdir(tmp_path) == []


def test_bias_balanced_moe_refused_in_one_line(tmp_path):
  cfg = tiny_cfg(**ROPE, mlp='moe', moe=dict(n_routed=4, balance='bias'))
  with pytest.raises(UserError, match="moe.balance='bias'.*Qwen2MoeForCausalLM, needs "
                     "moe.balance='aux' .Qwen2-MoE has no per-expert routing bias") as e:
    E.export_hf(cfg, None, str(tmp_path / 'hf'))
  assert '\n' not in str(e.value) and os.listdir(tmp_path) == []


def test_out_dir_needs_overwrite_and_is_replaced(gpt2, tmp_path):
  cfg, params, _ = gpt2
  out = tmp_path / 'hf'
  out.mkdir()
  (out / 'old.txt').write_text('keep me')
  with pytest.raises(UserError, match='not empty'):
    E.export_hf(cfg, params, str(out))
  assert os.listdir(out) == ['old.txt']
  E.export_hf(cfg, params, str(out), overwrite=True)
  assert sorted(os.listdir(out)) == ['README.md', 'config.json', 'generation_config.json',
                                     'model.safetensors']
  # Ordinary permissions (the temporary directory it was built in is 0700).
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(out).st_mode & 0o777 == 0o755 & ~umask
  assert os.stat(out / 'config.json').st_mode & 0o777 == 0o644 & ~umask
  assert os.listdir(tmp_path) == ['hf']   # no temporary or old directories left behind
  with pytest.raises(UserError, match='do not match'):
    E.export_hf(cfg, {**params, 'wte': {'embedding': np.zeros((8, 64))}}, str(out), overwrite=True)


def test_wrong_tokenizer_refused(gpt2, tok_dir, tmp_path):
  cfg, params, _ = gpt2
  cfg = dataclasses.replace(cfg, real_vocab_size=cfg.real_vocab_size - 1)
  with pytest.raises(UserError, match='wrong tokenizer'):
    E.export_hf(cfg, params, str(tmp_path / 'hf'), tok_dir)


def test_import_refuses_what_it_cannot_represent(tmp_path):
  (tmp_path / 'bert').mkdir()
  (tmp_path / 'bert' / 'config.json').write_text(json.dumps({'architectures': ['BertForMaskedLM']}))
  with pytest.raises(UserError, match='BertForMaskedLM'):
    E.import_hf(str(tmp_path / 'bert'))

  cfg = tiny_cfg(**ROPE, mlp='moe', moe=dict(n_routed=4, top_k=2))
  out = E.export_hf(cfg, random_params(cfg), str(tmp_path / 'moe'))
  weights = os.path.join(out, 'model.safetensors')
  t = load_file(weights)
  t['model.layers.1.mlp.shared_expert_gate.weight'] += 1.0   # a real Qwen2-MoE gate
  save_file(t, weights, metadata={'format': 'pt'})
  with pytest.raises(UserError, match='shared_expert_gate.weight is not zero'):
    E.import_hf(out)

