"""Tests for sample.py on tiny random models.

Compiling dominates the run time (the CPU is shared), so the tests share four decode
programs: one config per variant, prompts in one bucket (P=16, S=64), batch 1 or 3, greedy
or sampled with filters. Params are drawn with numpy, which compiles nothing.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import VOCAB, tiny_cfg
from zhgpt_jax import model as M
from zhgpt_jax import sample as S
from zhgpt_jax import tokenizer as tok_lib
from zhgpt_jax.config import UserError, default_config

NEW = 10
VARIANTS = {
    'gpt2': dict(),
    'modern': dict(position='rope', mlp='swiglu', norm='rmsnorm', bias=False,
                   tie_embeddings=False, n_kv_head=2),
    # MLA decodes over its latent cache with W_kv_b absorbed; the reference expands K and V.
    'mla': dict(position='rope', mlp='swiglu', norm='rmsnorm', bias=False, attention_kind='mla',
                mla=dict(q_lora_rank=0, kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8,
                         v_head_dim=16)),
    # Normed keys in the cache (Qwen3's QK-norm); a cap that bites at this weight scale.
    'qk_norm_softcap': dict(position='rope', mlp='swiglu', norm='rmsnorm', bias=False,
                            n_kv_head=2, qk_norm=True, logit_softcap=5.0),
}
PROMPTS = [[5, 17, 200, 3, 99, 42, 7], [250, 1], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]
SAMPLED = dict(temperature=1.0, top_k=50, top_p=0.95)   # one compiled program for all of them


@functools.lru_cache(maxsize=None)
def model(variant='gpt2'):
  """(cfg, params): norm scales 1, every other weight N(0, 0.2).

  Ten times the init scale: at init scale a model only repeats its last token, and greedy
  agreement would then test nothing.
  """
  cfg = tiny_cfg(**VARIANTS[variant])
  shapes = jax.eval_shape(lambda: M.init_params(cfg, jax.random.PRNGKey(0)))
  rng = np.random.RandomState(0)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: np.ones(x.shape, np.float32) if 'scale' in jax.tree_util.keystr(path)
      else rng.normal(0, 0.2, x.shape).astype(np.float32), shapes)
  return cfg, jax.device_put(params)


# One compiled program for every call below: same shape (2x4), all options traced.
sampling_logits = jax.jit(S.sampling_logits, static_argnames='real_vocab')
NONE_SEEN = np.zeros((2, 4), bool)


@functools.lru_cache(maxsize=None)
def _forward(cfg):
  return jax.jit(lambda params, tokens: M.GPT(cfg).apply({'params': params}, tokens)[0])


def generate_uncached(cfg, params, prompt, max_new_tokens, repetition_penalty=1.0):
  """Reference greedy decoding: the whole sequence through the model for every token.

  Returns (new tokens, the logits each was picked from). Right padding to seq_len keeps
  one compiled shape; causal attention makes it invisible.
  """
  tokens, logits = list(prompt), []
  for _ in range(max_new_tokens):
    x = np.zeros((1, cfg.seq_len), np.int32)
    x[0, :len(tokens)] = tokens
    row = np.asarray(_forward(cfg)(params, x))[0, len(tokens) - 1]
    logits.append(row)
    pick = row[:cfg.real_vocab_size].copy()
    seen = np.array(sorted(set(tokens)))
    pick[seen] = np.where(pick[seen] > 0, pick[seen] / repetition_penalty,
                          pick[seen] * repetition_penalty)
    tokens.append(int(np.argmax(pick)))
  return tokens[len(prompt):], logits


def cached_logits(cfg, params, prompt, max_new_tokens):
  """The cached loop's logits at every step, one `_advance` call per token."""
  state, run = S._begin(cfg, params, [prompt], max_new_tokens=max_new_tokens)
  out = [np.asarray(state['logits_BxV'][0])]
  for n in range(2, max_new_tokens + 1):
    state = S._advance(cfg, run.mode, params, state, run.opts, n)
    out.append(np.asarray(state['logits_BxV'][0]))
  return out


# ---------------------------------------------------------------- cache == recompute

@pytest.mark.parametrize('variant', VARIANTS)
def test_batch_matches_uncached_reference(variant):
  cfg, params = model(variant)
  got = S.generate(cfg, params, PROMPTS, max_new_tokens=NEW)
  for prompt, row in zip(PROMPTS, got):
    want, _ = generate_uncached(cfg, params, prompt, NEW)
    assert row == want
  assert len({tuple(r) for r in got}) == 3 and all(len(set(r)) > 2 for r in got)


@pytest.mark.parametrize('variant', ['gpt2', 'modern'])   # modern: grouped-query heads
def test_cached_logits_equal_recomputed(variant):
  cfg, params = model(variant)
  prompt = PROMPTS[0]
  _, want = generate_uncached(cfg, params, prompt, NEW)
  got = cached_logits(cfg, params, prompt, NEW)
  np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5, rtol=0)


def test_batch_row_equals_prompt_alone():
  cfg, params = model()
  batch = S.generate(cfg, params, PROMPTS, max_new_tokens=NEW)
  alone = [S.generate(cfg, params, [p], max_new_tokens=NEW)[0] for p in PROMPTS]
  assert batch == alone


def test_a_non_finite_row_leaves_the_other_rows_alone():
  """Row 0's prompt holds a token whose embedding is NaN (one the other rows neither hold nor
  generate): row 0's logits are NaN, and the other rows decode exactly as with clean weights
  (nothing of row 0 reaches their caches). An untied head: a tied one would carry the NaN row
  into every row's logits."""
  cfg, params = model('modern')
  clean = S.generate(cfg, params, PROMPTS, max_new_tokens=NEW)
  others = {t for row in PROMPTS[1:] + clean[1:] for t in row}
  bad = next(t for t in PROMPTS[0] if t not in others)
  wte = np.array(params['wte']['embedding'])
  wte[bad] = np.nan
  poisoned = dict(params, wte=dict(params['wte'], embedding=jnp.asarray(wte)))
  got = S.generate(cfg, poisoned, PROMPTS, max_new_tokens=NEW)
  assert got[1:] == clean[1:] and got[0] != clean[0]


def test_repetition_penalty_matches_reference():
  cfg, params = model()
  got = S.generate(cfg, params, [PROMPTS[0]], max_new_tokens=NEW, repetition_penalty=3.0)[0]
  want, _ = generate_uncached(cfg, params, PROMPTS[0], NEW, repetition_penalty=3.0)
  assert got == want
  assert got != S.generate(cfg, params, [PROMPTS[0]], max_new_tokens=NEW)[0]


# ---------------------------------------------------------------- sampling options

def test_argmax_is_jnp_argmax():
  """Ties go to the first index, a NaN wins (the first one), all -inf gives 0."""
  rng = np.random.RandomState(0)
  x = rng.randint(-3, 4, (6, 40)).astype(np.float32)   # many ties
  x[1, [7, 30]] = np.nan
  x[2] = -np.inf
  x[3, 5] = np.inf
  got = jax.jit(S.argmax)(x)
  np.testing.assert_array_equal(got, jnp.argmax(x, axis=-1))
  assert got.tolist()[:4] == [int(np.argmax(x[0])), 7, 0, 5]


def test_repetition_penalty_values():
  logits = np.array([[2.0, -1.0, 0.5, -3.0], [2.0, -1.0, 0.5, -3.0]], np.float32)
  seen = np.array([[True, True, False, False], [False, False, True, True]])
  got = sampling_logits(logits, seen, 0.0, 0, 1.0, 2.0)
  np.testing.assert_allclose(got, [[1.0, -2.0, 0.5, -3.0], [2.0, -1.0, 0.25, -6.0]])
  np.testing.assert_allclose(sampling_logits(logits, seen, 0.0, 0, 1.0, 1.0), logits)


def test_top_p_cuts_the_tail():
  probs_in = np.array([[0.2, 0.5, 0.3, 0.0], [0.3, 0.2, 0.4, 0.1]], np.float32)
  with np.errstate(divide='ignore'):
    logits = np.log(probs_in)   # the 0 becomes -inf, as a padded or cut token would be
  probs = lambda p: np.asarray(jax.nn.softmax(sampling_logits(logits, NONE_SEEN, 1.0, 0, p)))
  np.testing.assert_allclose(probs(0.4), [[0, 1, 0, 0], [0, 0, 1, 0]], atol=1e-6)
  np.testing.assert_allclose(probs(0.6), [[0, 0.625, 0.375, 0], [3 / 7, 0, 4 / 7, 0]], atol=1e-6)
  np.testing.assert_allclose(probs(1.0), probs_in, atol=1e-6)


def test_top_k_then_temperature():
  logits = np.array([[1.0, 4.0, 3.0, 2.0], [0.0, -1.0, 5.0, 6.0]], np.float32)
  got = sampling_logits(logits, NONE_SEEN, 2.0, 2, 1.0)
  np.testing.assert_allclose(got, [[-np.inf, 2.0, 1.5, -np.inf], [-np.inf, -np.inf, 2.5, 3.0]])


def test_padded_vocab_masked():
  logits = np.array([[0.0, 1.0, 9.0, 8.0], [3.0, 1.0, 9.0, 8.0]], np.float32)
  got = sampling_logits(logits, NONE_SEEN, 1.0, 0, 1.0, real_vocab=2)
  np.testing.assert_allclose(got, [[0.0, 1.0, -np.inf, -np.inf], [3.0, 1.0, -np.inf, -np.inf]])


@pytest.mark.parametrize('penalty', [1.0, 3.0])
def test_top_k_1_is_greedy(penalty):
  cfg, params = model()
  greedy = S.generate(cfg, params, [PROMPTS[0]], max_new_tokens=NEW, repetition_penalty=penalty)
  top1 = S.generate(cfg, params, [PROMPTS[0]], max_new_tokens=NEW, repetition_penalty=penalty,
                    **dict(SAMPLED, top_k=1))
  assert top1 == greedy


def test_seed():
  cfg, params = model()
  runs = [S.generate(cfg, params, [PROMPTS[0]], max_new_tokens=NEW, seed=s, **SAMPLED)
          for s in (1, 1, 2)]
  assert runs[0] == runs[1] and runs[0] != runs[2]
  assert all(0 <= t < VOCAB for t in runs[0][0] + runs[2][0])


def test_padded_vocab_never_sampled():
  cfg, params = model()
  assert cfg.vocab_size > VOCAB
  # ln_f outputs a constant vector along axis 0, and the padding rows of the tied embedding
  # point along it: every padded id has a far larger logit than any real one.
  params = jax.tree.map(lambda x: x, params)
  params['ln_f'] = dict(scale=jnp.zeros(cfg.d_model), bias=jnp.zeros(cfg.d_model).at[0].set(1.0))
  params['wte'] = dict(embedding=params['wte']['embedding'].at[VOCAB:, 0].set(1e3))
  assert all(0 <= t < VOCAB for row in S.generate(cfg, params, PROMPTS, max_new_tokens=NEW)
             for t in row)
  sampled = [S.generate(cfg, params, [PROMPTS[0]], max_new_tokens=NEW, seed=s,
                        **dict(SAMPLED, temperature=5.0))[0] for s in range(3)]
  assert all(0 <= t < VOCAB for row in sampled for t in row)


# ---------------------------------------------------------------- stopping and lengths

def test_stop_ids_end_rows():
  cfg, params = model()
  full = S.generate(cfg, params, PROMPTS, max_new_tokens=NEW)
  stop = full[0][3]
  cut = S.generate(cfg, params, PROMPTS, max_new_tokens=NEW, stop_ids=[stop])
  for row, c in zip(full, cut):
    assert c == (row[:row.index(stop)] if stop in row else row)
  assert cut[0] == full[0][:full[0].index(stop)]


def test_loop_ends_when_all_rows_stop():
  cfg, params = model()
  first = S.generate(cfg, params, [PROMPTS[0]], max_new_tokens=1)[0][0]
  assert S.generate(cfg, params, [PROMPTS[0]], max_new_tokens=NEW, stop_ids=[first]) == [[]]
  state, run = S._begin(cfg, params, [PROMPTS[0]], max_new_tokens=NEW, stop_ids=[first])
  state = S._advance(cfg, run.mode, params, state, run.opts, NEW)
  assert int(state['step']) == 1


def test_prompt_too_long_raises():
  cfg, params = model()
  with pytest.raises(UserError, match='seq_len=64'):
    S.generate(cfg, params, [list(range(60))], max_new_tokens=NEW)
  with pytest.raises(UserError, match='no room'):
    S.generate(cfg, params, [[1]], max_new_tokens=64, sliding=True)
  with pytest.raises(UserError, match='empty prompt'):
    S.generate(cfg, params, [[]], max_new_tokens=NEW)
  with pytest.raises(UserError, match='top_p'):
    S.generate(cfg, params, [[1]], max_new_tokens=NEW, top_p=0.0)


def test_sliding_keeps_the_prompt_tail():
  cfg, params = model()
  prompt = [int(t) for t in np.random.RandomState(0).randint(0, VOCAB, 30)]
  new = 48   # leaves room for 16 prompt tokens: the same compiled bucket as the other tests
  got = S.generate(cfg, params, [prompt], max_new_tokens=new, sliding=True)
  assert got == S.generate(cfg, params, [prompt[-16:]], max_new_tokens=new)
  assert len(got[0]) == new


# ---------------------------------------------------------------- streaming

@pytest.mark.parametrize('options', [dict(), SAMPLED])
def test_stream_chunks_concatenate_to_generate(options):
  cfg, params = model()
  want = S.generate(cfg, params, [PROMPTS[0]], max_new_tokens=NEW, **options)[0]
  chunks = list(S.stream(cfg, params, PROMPTS[0], max_new_tokens=NEW, chunk=3, **options))
  assert [len(c) for c in chunks] == [3, 3, 3, 1]
  assert sum(chunks, []) == want


def test_stream_stops_at_stop_id():
  cfg, params = model()
  full = S.generate(cfg, params, [PROMPTS[0]], max_new_tokens=NEW)[0]
  chunks = list(S.stream(cfg, params, PROMPTS[0], max_new_tokens=NEW, chunk=2,
                         stop_ids=[full[4]]))
  assert sum(chunks, []) == full[:full.index(full[4])]
  assert len(chunks) <= 3


@functools.lru_cache(maxsize=None)
def tokenizer():
  text = ('村民们都很高兴，在这里生活了很多年。今天天气很好，我们一起去公园散步吧。'
          '中国人民站起来了。学习使人进步，读书使人快乐。')
  tok = tok_lib.train_tokenizer([text] * 3, vocab_size=VOCAB, min_frequency=1)
  assert tok.get_vocab_size() == VOCAB
  return tok


def test_longest_run():
  assert S.longest_run([]) == 0 and S.longest_run([5]) == 1
  assert S.longest_run([1, 2, 1, 2, 1, 2]) == 1     # a repeated phrase is not a run
  assert S.longest_run([7, 3, 3, 3, 9, 9, 3, 3]) == 3


def test_generate_text_decodes_generate_ids():
  cfg, params = model()
  tok = tokenizer()
  sample_cfg = default_config().sample
  sample_cfg.update(max_new_tokens=12, temperature=0.0)
  ids = S.generate_ids(cfg, params, tok, ['村民们'], sample_cfg)[0]
  assert 0 < len(ids) <= 12
  assert S.generate_text(cfg, params, tok, ['村民们'], sample_cfg)[0] == tok.decode(
      ids, skip_special_tokens=False)


def test_complete_suffix_holds_back_split_characters():
  tok = tokenizer()
  byte_ids = tok.encode('龙').ids   # not in the training text: three byte tokens
  assert len(byte_ids) == 3
  partial = tok.decode(byte_ids[:2], skip_special_tokens=False)
  assert partial.endswith('\ufffd') and S.complete_suffix('好' + partial, 0) == '好'
  assert S.complete_suffix('好' + tok.decode(byte_ids, skip_special_tokens=False), 1) == '龙'


def test_stream_text_concatenates_to_generate_text():
  cfg, params = model()
  tok = tokenizer()
  sample_cfg = default_config().sample
  sample_cfg.update(max_new_tokens=40, repetition_penalty=1.0, seed=3, **SAMPLED)
  want = S.generate_text(cfg, params, tok, ['村民们'], sample_cfg)[0]
  pieces = list(S.stream_text(cfg, params, tok, '村民们', sample_cfg))
  assert ''.join(pieces) == want and want
  assert all(not p.endswith('\ufffd') for p in pieces[:-1])
