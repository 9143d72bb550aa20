import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import VOCAB, tiny_cfg
from zhgpt_jax import attention as A
from zhgpt_jax import model as M
from zhgpt_jax import parallel, train
from zhgpt_jax.config import UserError, default_config, validate


MLA = dict(q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
           v_head_dim=24)
VARIANTS = {
    'gpt2': dict(),
    'modern': dict(position='rope', mlp='swiglu', norm='rmsnorm', bias=False,
                   tie_embeddings=False, n_kv_head=2),
    'moe': dict(position='rope', mlp='moe', norm='rmsnorm', bias=False,
                moe=dict(n_routed=4, top_k=2, n_shared=1)),
    # DeepSeek-V3's architecture: MLA with a query latent, sigmoid-gated MoE with the routing
    # bias, renormalised and scaled gates and group-limited routing.
    'deepseek': dict(position='rope', mlp='moe', norm='rmsnorm', bias=False,
                     attention_kind='mla', mla=MLA,
                     moe=dict(n_routed=8, top_k=2, n_shared=1, gate='sigmoid', balance='bias',
                              routed_scale=2.5, n_group=4, topk_group=2, first_dense=1)),
    # Qwen3's QK-norm on the Llama layout, and Gemma 2's final-logit soft-capping.
    'qk_norm_softcap': dict(position='rope', mlp='swiglu', norm='rmsnorm', bias=False,
                            tie_embeddings=False, n_kv_head=2, qk_norm=True, logit_softcap=30.0),
}


def logits(cfg, params, tokens, **kw):
  return M.GPT(cfg).apply({'params': params}, tokens, **kw)[0]


def test_gpt2_small_has_124m_params():
  c = default_config('small')
  c.model.vocab_multiple = 1
  cfg = M.model_config(c.model, 50257)
  shapes = jax.eval_shape(lambda: M.init_params(cfg, jax.random.PRNGKey(0)))
  assert M.count_params(shapes) == 124_439_808


def test_vocab_comes_from_tokenizer_padded():
  cfg = tiny_cfg()
  assert cfg.real_vocab_size == VOCAB and cfg.vocab_size == 384
  params = M.init_params(cfg, jax.random.PRNGKey(0))
  assert params['wte']['embedding'].shape == (384, 64)


@pytest.mark.parametrize('variant', VARIANTS)
def test_causal_and_initial_loss(variant):
  cfg = tiny_cfg(**VARIANTS[variant])
  params = M.init_params(cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, VOCAB)
  out = logits(cfg, params, tokens)
  assert out.dtype == jnp.float32 and out.shape == (2, 16, cfg.vocab_size)
  for t in (0, 7, 15):
    changed = logits(cfg, params, tokens.at[:, t].set((tokens[:, t] + 1) % VOCAB))
    np.testing.assert_allclose(out[:, :t], changed[:, :t], atol=1e-6)
    assert not np.allclose(out[:, t:], changed[:, t:])
  # Random next tokens are unpredictable: the loss at init is that of a uniform guess.
  loss = optax.softmax_cross_entropy_with_integer_labels(out[:, :-1], tokens[:, 1:]).mean()
  assert abs(float(loss) - np.log(cfg.vocab_size)) < 0.1


# Each switch of config.model alone, from the GPT-2 baseline (VARIANTS['gpt2']).
SWITCHES = {
    'position=rope': dict(position='rope'),
    'mlp=swiglu': dict(mlp='swiglu'),
    'mlp=relu2': dict(mlp='relu2'),
    'mlp=moe': dict(mlp='moe', moe=dict(n_routed=4)),
    'norm=rmsnorm': dict(norm='rmsnorm'),
    'qk_norm=True': dict(qk_norm=True),
    'logit_softcap=30': dict(logit_softcap=30.0),
    'bias=False': dict(bias=False),
    'tie_embeddings=False': dict(tie_embeddings=False),
    'n_kv_head=2': dict(n_kv_head=2),
    'attention_kind=mla': dict(position='rope', attention_kind='mla', mla=MLA),  # needs rope
    'remat=block': dict(remat='block'),
    'dtype=bfloat16': dict(dtype='bfloat16'),
    'dropout=0.1': dict(dropout=0.1),
}


# Compiling is nearly all of a training test's cost. Without XLA's backend optimisations the
# train step compiles in a fifth less CPU time and gives the same losses (within 1e-3).
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def overfit(cfg, steps=40):
  """Train losses of `steps` real train steps (AdamW, schedule, clipping) on one random batch."""
  c = default_config('tiny')
  c.optim.update(lr=1e-2, warmup_steps=2)
  c.train.steps = steps
  opt, step = train.make_train_step(c, cfg)
  # M.init_params without its jit: op by op, the ops all configs share compile only once.
  params = M.GPT(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))['params']
  state = parallel.replicate(train.new_state(opt, params, 0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 4, 33), 0, VOCAB)  # [accum, B, L + 1]
  batch = parallel.replicate({'inputs': tokens[..., :-1], 'targets': tokens[..., 1:]})
  step = step.lower(state, batch).compile(FAST_COMPILE)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(metrics['loss'][0])
  return [float(x) for x in losses]


@pytest.mark.parametrize('variant', VARIANTS)
def test_overfits_one_batch(variant):
  losses = overfit(tiny_cfg(**VARIANTS[variant]))
  # From a uniform guess over the padded vocab (ln 384 = 5.95) to a memorised batch.
  assert losses[0] > 5.5 and losses[-1] < 0.5, losses[::10]


@pytest.mark.parametrize('switch', SWITCHES)
def test_each_switch_alone_trains(switch):
  # One layer: compiling the step is nearly all of the cost, and a switch acts in every layer.
  cfg = tiny_cfg(n_layer=1, **SWITCHES[switch])
  assert cfg != tiny_cfg(n_layer=1)    # the switch exists under that name and took effect
  losses = overfit(cfg)
  assert losses[0] > 5.5 and losses[-1] < 0.5, losses[::10]


def test_bfloat16_compute_keeps_float32_params_and_logits():
  cfg = tiny_cfg(dtype='bfloat16')
  params = M.init_params(cfg, jax.random.PRNGKey(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  tokens = jnp.arange(16)[None] % VOCAB
  out_bf16 = logits(cfg, params, tokens)
  out_f32 = logits(dataclasses.replace(cfg, dtype='float32'), params, tokens)
  assert out_bf16.dtype == jnp.float32
  np.testing.assert_allclose(out_bf16, out_f32, atol=0.1)


def test_logit_softcap_bounds_the_logits():
  cfg = tiny_cfg(**VARIANTS['qk_norm_softcap'])    # cap 30
  params = M.init_params(cfg, jax.random.PRNGKey(0))
  params = {**params, 'lm_head': params['lm_head'] * 300}   # logits far past the cap
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, VOCAB)
  capped = np.asarray(logits(cfg, params, tokens))
  raw = np.asarray(logits(dataclasses.replace(cfg, logit_softcap=0.0), params, tokens))
  assert np.abs(raw).max() > 60 and np.abs(capped).max() < 30
  np.testing.assert_allclose(capped, 30 * np.tanh(raw / 30), rtol=1e-5, atol=1e-5)
  assert (np.argmax(capped, -1) == np.argmax(raw, -1)).all()   # monotone: greedy unchanged


def test_qk_norm_and_softcap_mistakes_are_one_line():
  for overrides, message in (
      (dict(logit_softcap=-1.0), 'config.model.logit_softcap=-1.0: must be >= 0'),
      (dict(position='rope', attention_kind='mla', qk_norm=True),
       'config.model.qk_norm=True: not for MLA')):
    c = default_config('tiny')
    c.model.update(overrides)
    with pytest.raises(UserError, match=re.escape(message)) as e:
      validate(c)
    assert '\n' not in str(e.value)


def test_rope_scores_depend_only_on_offset():
  q = jax.random.normal(jax.random.PRNGKey(0), (1, 1, 1, 16))
  k = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 1, 16))

  def score(pq, pk):
    rq = A.rope(q, jnp.array([[pq]]), 10000.0)
    rk = A.rope(k, jnp.array([[pk]]), 10000.0)
    return float(jnp.sum(rq * rk))

  assert score(5, 2) == pytest.approx(score(103, 100), abs=1e-4)
  assert score(7, 7) == pytest.approx(score(0, 0), abs=1e-4)
  assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)
  # Rotation preserves the vector's norm.
  assert float(jnp.linalg.norm(A.rope(q, jnp.array([[9]]), 1e4))) == pytest.approx(
      float(jnp.linalg.norm(q)), rel=1e-5)


@pytest.mark.parametrize('variant', ['gpt2', 'moe'])
def test_remat_gives_same_gradients(variant):
  cfg = tiny_cfg(**VARIANTS[variant])
  params = M.init_params(cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 17), 0, VOCAB)

  def grads(c):
    def loss_fn(p):
      out = M.GPT(c).apply({'params': p}, tokens[:, :-1], train=True)[0]
      return optax.softmax_cross_entropy_with_integer_labels(out, tokens[:, 1:]).mean()
    return jax.jit(jax.grad(loss_fn))(params)

  plain, remat = grads(cfg), grads(dataclasses.replace(cfg, remat='block'))
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_segments_never_attend_across_boundaries():
  cfg = tiny_cfg()
  params = M.init_params(cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 16), 0, VOCAB)
  segments = jnp.array([[1] * 6 + [2] * 10])
  positions = jnp.array([list(range(6)) + list(range(10))])
  out = logits(cfg, params, tokens, segment_ids_BxL=segments, positions_BxL=positions)
  other = tokens.at[0, :6].set((tokens[0, :6] + 7) % VOCAB)   # change the first conversation
  out2 = logits(cfg, params, other, segment_ids_BxL=segments, positions_BxL=positions)
  np.testing.assert_allclose(out[:, 6:], out2[:, 6:], atol=1e-6)
  # The second segment alone, from position 0, gives the same logits as packed.
  alone = logits(cfg, params, tokens[:, 6:])
  np.testing.assert_allclose(out[:, 6:], alone, atol=1e-5)


def moe_layer(gate='softmax', n_routed=4, top_k=2):
  cfg = tiny_cfg(**{**VARIANTS['moe'], 'moe': dict(gate=gate, n_routed=n_routed, top_k=top_k)})
  layer = M.MoE(cfg)
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 8, cfg.d_model))
  params = layer.init(jax.random.PRNGKey(0), x)['params']
  return cfg, layer, params, x


@pytest.mark.parametrize('gate', ['softmax', 'sigmoid'])
def test_moe_gates_and_load(gate):
  cfg, layer, params, x = moe_layer(gate)
  _, aux = layer.apply({'params': params}, x)
  # Every token picks top_k experts: the load fractions sum to one.
  assert float(aux['load'].sum()) == pytest.approx(1.0, abs=1e-6)
  logits_ = x @ params['router']['kernel']
  scores = jax.nn.softmax(logits_, -1) if gate == 'softmax' else jax.nn.sigmoid(logits_)
  top = jax.lax.top_k(scores, cfg.moe.top_k)[0].sum(-1)
  if gate == 'sigmoid':   # renormalised over the chosen experts
    np.testing.assert_allclose(top / top, 1.0)
  else:                   # softmax over all experts: chosen gates sum to at most one
    assert float(top.max()) <= 1.0 + 1e-6


def test_moe_output_is_gate_weighted_sum_of_experts():
  cfg, layer, params, x = moe_layer()
  y, _ = layer.apply({'params': params}, x)
  tok = x[0, 3]
  scores = jax.nn.softmax(tok @ params['router']['kernel'])
  top_vals, top_idx = jax.lax.top_k(scores, cfg.moe.top_k)
  expected = 0.0
  for g, e in zip(top_vals, top_idx):
    h = jax.nn.silu(tok @ params['w_gate'][e]) * (tok @ params['w_up'][e])
    expected = expected + g * (h @ params['w_down'][e])
  sh = params['shared']
  expected = expected + (jax.nn.silu(tok @ sh['gate']['kernel']) * (tok @ sh['up']['kernel'])) @ sh['down']['kernel']
  np.testing.assert_allclose(y[0, 3], expected, atol=1e-5)


def test_uniform_routing_gives_minimum_balance_loss():
  cfg, layer, params, x = moe_layer(n_routed=4, top_k=1)
  zero_router = jax.tree.map(lambda p: p, params)
  # Tokens spread evenly over experts with equal mean scores: the loss is exactly 1.
  one_hot = jnp.eye(4)[jnp.arange(16) % 4].reshape(2, 8, 4)
  zero_router['router']['kernel'] = jnp.eye(cfg.d_model, 4) * 5.0
  x_uniform = jnp.zeros((2, 8, cfg.d_model)).at[..., :4].set(one_hot)
  _, aux = layer.apply({'params': zero_router}, x_uniform)
  assert float(aux['balance']) == pytest.approx(1.0, abs=1e-5)
  np.testing.assert_allclose(aux['load'], 0.25, atol=1e-6)
  # All tokens to one expert: the loss grows.
  x_skew = jnp.zeros((2, 8, cfg.d_model)).at[..., 0].set(1.0)
  _, aux_skew = layer.apply({'params': zero_router}, x_skew)
  assert float(aux_skew['balance']) > 1.5


def test_flops_per_token_formula():
  cfg = tiny_cfg()
  params = M.init_params(cfg, jax.random.PRNGKey(0))
  n = M.count_params(params) - cfg.seq_len * cfg.d_model
  assert M.flops_per_token(cfg, params) == 6 * n + 12 * 2 * 64 * 64
  untied = tiny_cfg(tie_embeddings=False)      # the head is a matmul, the token table is not
  assert M.flops_per_token(untied, M.init_params(untied, jax.random.PRNGKey(0))) == \
      M.flops_per_token(cfg, params)
  moe = tiny_cfg(**VARIANTS['moe'])
  p = M.init_params(moe, jax.random.PRNGKey(0))
  per_expert = 3 * moe.d_model * moe.moe.expert_hidden
  assert M.active_params(moe, p) == M.count_params(p) - 2 * 2 * per_expert
