"""gguf_export.py: each family written as GGUF and read back with gguf's own reader -- the
architecture, metadata, tokenizer and every tensor checked -- and the refusals.

That llama.cpp computes what our model does from these files is bench/gguf_parity.py's job
(llama-cpp-python is too heavy for CI); this file checks the layout llama.cpp's loaders need.
"""

import json
import os
import subprocess
import sys

from flax import traverse_util
import numpy as np
import pytest

from helpers import tiny_cfg
from zhgpt_jax import gguf_export as G
from zhgpt_jax import tokenizer as T
from zhgpt_jax.config import UserError

gguf = pytest.importorskip('gguf')

TEXTS = ['村民们都很高兴，今天的天气很好。', '我们一起去北京看看长城吧！',
         '中国人民在春节的时候回家团聚。', '他说：“这本书很有意思，我看了三遍。”'] * 3
ROPE = dict(position='rope', norm='rmsnorm', bias=False, mlp='swiglu')
MOE = dict(ROPE, mlp='moe')
FAMILIES = {   # name: (model overrides, llama.cpp architecture)
    'gpt2': (dict(), 'gpt2'),
    'llama_untied_gqa': (dict(ROPE, n_kv_head=2, tie_embeddings=False), 'llama'),
    'qwen2_qkv_bias': (dict(ROPE, n_kv_head=2, qkv_bias=True), 'qwen2'),
    'moe_first_dense': (dict(MOE, moe=dict(n_routed=4, top_k=2, n_shared=2, first_dense=1)),
                        'deepseek'),
    'moe_no_shared': (dict(MOE, tie_embeddings=False, moe=dict(n_routed=4, top_k=2, n_shared=0)),
                      'deepseek'),
    'qwen2_moe': (dict(MOE, qkv_bias=True, n_kv_head=2,
                       moe=dict(n_routed=4, top_k=2, n_shared=1, shared_gate=True)), 'qwen2moe'),
    # configs/moe.py:deepseek's routing: sigmoid gate, routing bias, first layer dense
    'moe_sigmoid_bias': (dict(MOE, moe=dict(n_routed=4, top_k=2, n_shared=2, first_dense=1,
                                            gate='sigmoid', balance='bias')), 'glm4moe'),
}


@pytest.fixture(scope='module')
def tok_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tok'))
  T.save_tokenizer(T.train_tokenizer(TEXTS, vocab_size=300, min_frequency=1), path)
  return path


def model(tok_dir, overrides, seed=0):
  cfg = tiny_cfg(T.load_tokenizer(tok_dir).get_vocab_size(), vocab_multiple=64, **overrides)
  import jax
  from zhgpt_jax import model as M
  shapes = traverse_util.flatten_dict(
      jax.eval_shape(lambda: M.init_params(cfg, jax.random.PRNGKey(0))), sep='/')
  rng = np.random.RandomState(seed)
  return cfg, {k: rng.standard_normal(s.shape).astype(np.float32) for k, s in shapes.items()}


def read(path):
  """(metadata {key: value}, tensors {name: (type name, float32 array)}) via gguf's reader."""
  r = gguf.GGUFReader(path)
  meta = {k: f.contents() for k, f in r.fields.items()}
  tensors = {}
  for t in r.tensors:
    data = np.asarray(t.data)
    if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
      data = gguf.quants.dequantize(data, t.tensor_type)
    tensors[t.name] = (t.tensor_type.name, np.asarray(data, np.float32))
  return meta, tensors


def expected_names(cfg, arch):
  """The tensors llama.cpp's loader of `arch` reads (src/models/<arch>.cpp), for `cfg`."""
  names = {'token_embd.weight', 'output_norm.weight'}
  if not cfg.tie_embeddings or arch == 'qwen2moe':
    names.add('output.weight')
  if arch == 'gpt2':
    names |= {'position_embd.weight', 'output_norm.bias'}
  for i in range(cfg.n_layer):
    b = f'blk.{i}.'
    names |= {b + 'attn_norm.weight', b + 'attn_output.weight',
              b + ('post_attention_norm.weight' if arch == 'glm4moe' else 'ffn_norm.weight')}
    if arch == 'gpt2':
      names |= {b + n for n in ('attn_norm.bias', 'ffn_norm.bias', 'attn_qkv.weight',
                                'attn_qkv.bias', 'attn_output.bias', 'ffn_up.weight',
                                'ffn_up.bias', 'ffn_down.weight', 'ffn_down.bias')}
      continue
    names |= {b + f'attn_{x}.weight' for x in 'qkv'}
    if cfg.qkv_bias:
      names |= {b + f'attn_{x}.bias' for x in 'qkv'}
    if not cfg.is_moe_layer(i):
      names |= {b + f'ffn_{x}.weight' for x in ('gate', 'up', 'down')}
      continue
    names |= {b + 'ffn_gate_inp.weight'}
    names |= {b + f'ffn_{x}_{e}.weight' for x in ('gate', 'up', 'down') for e in ('exps', 'shexp')}
    if arch == 'qwen2moe':
      names.add(b + 'ffn_gate_inp_shexp.weight')
    if arch == 'glm4moe':
      names.add(b + 'exp_probs_b.bias')
  return names


@pytest.mark.parametrize('family', FAMILIES)
def test_family_written_and_read_back(family, tok_dir, tmp_path):
  overrides, arch = FAMILIES[family]
  cfg, flat = model(tok_dir, overrides)
  assert G.architecture(cfg) == arch
  path = str(tmp_path / 'm.gguf')
  summary = G.write_gguf(cfg, flat, path, tok_dir, 'f32')
  assert summary['arch'] == arch and summary['pre'] == 'gpt-2'
  meta, t = read(path)
  v, d, h = cfg.real_vocab_size, cfg.d_model, cfg.head_dim
  assert cfg.vocab_size > v   # padded: the padding rows are left out
  assert meta['general.architecture'] == arch
  assert (meta[f'{arch}.context_length'], meta[f'{arch}.embedding_length'],
          meta[f'{arch}.block_count'], meta[f'{arch}.attention.head_count'],
          meta[f'{arch}.attention.head_count_kv']) == (cfg.seq_len, d, cfg.n_layer, cfg.n_head,
                                                       cfg.n_kv_head)
  assert meta[f'{arch}.feed_forward_length'] == cfg.mlp_hidden
  if arch != 'gpt2':
    assert meta[f'{arch}.rope.dimension_count'] == h
    assert meta[f'{arch}.rope.freq_base'] == cfg.rope_theta
    assert np.isclose(meta[f'{arch}.attention.layer_norm_rms_epsilon'], cfg.norm_eps)
  if cfg.mlp == 'moe':
    assert (meta[f'{arch}.expert_count'], meta[f'{arch}.expert_used_count'],
            meta[f'{arch}.expert_feed_forward_length']) == (cfg.moe.n_routed, cfg.moe.top_k,
                                                            cfg.moe.expert_hidden)
  if arch in ('deepseek', 'glm4moe'):
    assert meta[f'{arch}.leading_dense_block_count'] == cfg.moe.first_dense
    assert meta[f'{arch}.expert_shared_count'] == max(cfg.moe.n_shared, 1)
  if arch == 'glm4moe':   # DeepSeek-V3's routing: sigmoid, weights renormalised over the k
    assert meta['glm4moe.expert_gating_func'] == gguf.ExpertGatingFuncType.SIGMOID
    assert meta['glm4moe.expert_weights_norm'] is True

  assert set(t) == expected_names(cfg, arch)
  assert all(kind == 'F32' for kind, _ in t.values())
  g = {k: w for k, (_, w) in t.items()}
  np.testing.assert_array_equal(g['token_embd.weight'], flat['wte/embedding'][:v])
  if not cfg.tie_embeddings:
    np.testing.assert_array_equal(g['output.weight'], flat['lm_head'].T[:v])
  b0, a0 = 'blk.0.', 'h_0/attn/'
  if arch == 'gpt2':
    np.testing.assert_array_equal(g['position_embd.weight'], flat['wpe/embedding'])
    qkv = g[b0 + 'attn_qkv.weight']   # [3d, d]: q rows, then k, then v
    for j, x in enumerate('qkv'):
      np.testing.assert_array_equal(qkv[j * d:(j + 1) * d], flat[a0 + x + '/kernel'].T)
    np.testing.assert_array_equal(g[b0 + 'ffn_down.weight'], flat['h_0/mlp/proj/kernel'].T)
  else:
    for x, heads in (('q', cfg.n_head), ('k', cfg.n_kv_head)):
      ours = flat[a0 + x + '/kernel'].T.reshape(heads, h, d)
      got = g[b0 + f'attn_{x}.weight'].reshape(heads, h, d)
      if arch in ('llama', 'deepseek'):
        # llama.cpp rotates pairs (2i, 2i+1) where we rotate (i, i + h/2): same frequencies.
        np.testing.assert_array_equal(got[:, 0::2], ours[:, :h // 2])
        np.testing.assert_array_equal(got[:, 1::2], ours[:, h // 2:])
      else:
        np.testing.assert_array_equal(got, ours)
    np.testing.assert_array_equal(g[b0 + 'attn_v.weight'], flat[a0 + 'v/kernel'].T)
    if cfg.qkv_bias:
      np.testing.assert_array_equal(g[b0 + 'attn_v.bias'], flat[a0 + 'v/bias'])
  last = f'blk.{cfg.n_layer - 1}.'
  if cfg.mlp == 'moe':
    m = f'h_{cfg.n_layer - 1}/moe/'
    np.testing.assert_array_equal(g[last + 'ffn_gate_inp.weight'], flat[m + 'router/kernel'].T)
    for j in range(cfg.moe.n_routed):   # expert j's down projection, [d, f] as torch stores it
      np.testing.assert_array_equal(g[last + 'ffn_down_exps.weight'][j], flat[m + 'w_down'][j].T)
      np.testing.assert_array_equal(g[last + 'ffn_gate_exps.weight'][j], flat[m + 'w_gate'][j].T)
    if cfg.moe.n_shared:
      np.testing.assert_array_equal(g[last + 'ffn_up_shexp.weight'], flat[m + 'shared/up/kernel'].T)
    else:   # a shared expert of zeros adds exactly nothing
      assert not np.any(g[last + 'ffn_down_shexp.weight'])
    if arch == 'qwen2moe':
      np.testing.assert_array_equal(g[last + 'ffn_gate_inp_shexp.weight'],
                                    flat[m + 'shared_gate/kernel'][:, 0])
    if arch == 'glm4moe':
      np.testing.assert_array_equal(g[last + 'exp_probs_b.bias'], flat[m + 'expert_bias'])
      np.testing.assert_array_equal(g[last + 'post_attention_norm.weight'],
                                    flat[f'h_{cfg.n_layer - 1}/ln_2/scale'])


def test_tokenizer_and_chat_template(tok_dir, tmp_path):
  cfg, flat = model(tok_dir, {})
  path = str(tmp_path / 'm.gguf')
  G.write_gguf(cfg, flat, path, tok_dir)
  meta, _ = read(path)
  tok = T.load_tokenizer(tok_dir)
  ids = T.special_ids(tok)
  assert meta['tokenizer.ggml.model'] == 'gpt2' and meta['tokenizer.ggml.pre'] == 'gpt-2'
  assert meta['tokenizer.ggml.tokens'] == [tok.id_to_token(i) for i in range(tok.get_vocab_size())]
  with open(os.path.join(tok_dir, 'tokenizer.json'), encoding='utf-8') as f:
    merges = json.load(f)['model']['merges']
  assert meta['tokenizer.ggml.merges'] == [' '.join(m) if isinstance(m, list) else m
                                           for m in merges]
  assert len(merges) == tok.get_vocab_size() - 256 - 4
  types = meta['tokenizer.ggml.token_type']
  assert [i for i, x in enumerate(types) if x == 3] == [0, 1, 2, 3]   # the special tokens
  assert set(types[4:]) == {1}
  assert (meta['tokenizer.ggml.eos_token_id'], meta['tokenizer.ggml.eot_token_id'],
          meta['tokenizer.ggml.padding_token_id']) == (ids.eos, ids.im_end, ids.pad)
  assert meta['tokenizer.ggml.add_bos_token'] is False
  assert meta['tokenizer.chat_template'] == T.CHAT_TEMPLATE
  assert meta['general.file_type'] == 0


@pytest.mark.parametrize('kind, stored, tol', [('f16', 'F16', 2e-3), ('bf16', 'BF16', 1.6e-2),
                                               ('q8_0', 'Q8_0', 1.6e-2)])
def test_types_keep_norms_and_routers_f32(kind, stored, tol, tok_dir, tmp_path):
  overrides, _ = FAMILIES['qwen2_moe']
  cfg, flat = model(tok_dir, overrides)
  G.write_gguf(cfg, flat, str(tmp_path / 'f32.gguf'), tok_dir, 'f32')
  G.write_gguf(cfg, flat, str(tmp_path / 'q.gguf'), tok_dir, kind)
  _, ref = read(str(tmp_path / 'f32.gguf'))
  _, got = read(str(tmp_path / 'q.gguf'))
  assert set(ref) == set(got)
  for name, (kind_got, w) in got.items():
    f32 = name.endswith(('_norm.weight', '.bias', 'ffn_gate_inp.weight', 'gate_inp_shexp.weight'))
    assert kind_got == ('F32' if f32 else stored), name
    want = ref[name][1]
    assert w.shape == want.shape, name
    # relative to the largest weight of the row: half an f16/bf16 ulp, or q8_0's 1/254 a block
    err = np.abs(w - want).max() / np.abs(want).max()
    assert err <= (0 if f32 else tol), (name, err)


def test_refusals_are_one_line(tok_dir, tmp_path):
  refused = {
      'sigmoid_gated_shared': (dict(MOE, moe=dict(gate='sigmoid', shared_gate=True)),
                               'glm4moe'),
      'every': (dict(MOE, moe=dict(every=2)), 'model.moe.every=2'),
      'gated_first_dense': (dict(MOE, moe=dict(shared_gate=True, first_dense=1)), 'first_dense'),
      'rope_gelu': (dict(position='rope', norm='rmsnorm', mlp='gelu'), 'position=rope'),
      'mla': (dict(position='rope', norm='rmsnorm', mlp='swiglu', attention_kind='mla'),
              'attention_kind=mla'),
      'scaled_gates': (dict(MOE, moe=dict(gate='sigmoid', routed_scale=2.5)), 'routed_scale=2.5'),
      'qk_norm': (dict(MOE, mlp='swiglu', qk_norm=True), 'qk_norm=True'),
      'softcap': (dict(logit_softcap=30.0), 'logit_softcap=30.0'),
  }
  for overrides, words in refused.values():
    cfg, flat = model(tok_dir, overrides)
    with pytest.raises(UserError, match=words) as e:
      G.write_gguf(cfg, flat, str(tmp_path / 'x.gguf'), tok_dir)
    assert '\n' not in str(e.value)
  assert not os.listdir(tmp_path)   # nothing written, not even a temporary file
  with pytest.raises(UserError, match='f4'):
    G.write_gguf(*model(tok_dir, {}), str(tmp_path / 'x.gguf'), tok_dir, 'f4')


def test_pre_tokenizer_named_by_what_it_does():
  byte_level = dict(type='ByteLevel', add_prefix_space=False, trim_offsets=True, use_regex=True)
  spec = dict(model=dict(type='BPE'), decoder=dict(type='ByteLevel'), normalizer=None)
  assert G.pre_tokenizer_name(dict(spec, pre_tokenizer=byte_level)) == 'gpt-2'
  qwen2 = dict(type='Sequence', pretokenizers=[
      dict(type='Split', pattern=dict(Regex=G._QWEN2_REGEX), behavior='Isolated', invert=False),
      dict(byte_level, use_regex=False)])
  assert G.pre_tokenizer_name(dict(spec, pre_tokenizer=qwen2, normalizer=dict(type='NFC'))) == \
      'qwen2'
  for bad in (dict(byte_level, add_prefix_space=True), dict(type='Whitespace')):
    with pytest.raises(UserError, match='pre-tokenizer'):
      G.pre_tokenizer_name(dict(spec, pre_tokenizer=bad))
  with pytest.raises(UserError, match='WordPiece'):
    G.pre_tokenizer_name(dict(model=dict(type='WordPiece'), decoder=dict(type='WordPiece')))


def test_modelfile_for_ollama():
  text = G.modelfile('tiny.gguf', True, ['<|endoftext|>', '<|im_end|>'])
  assert text.startswith('FROM ./tiny.gguf\n')
  assert '<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n' in text
  assert text.endswith('PARAMETER stop "<|endoftext|>"\nPARAMETER stop "<|im_end|>"\n')
