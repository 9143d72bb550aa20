"""The DeepSeek-style MoE: sparse dispatch equals dense, capacity drops are counted, the
auxiliary-loss-free bias steers the choice only, expert-parallel training (parallel.strategy=
fsdp with parallel.expert=4) equals one device, and a bias-balanced run resumes bitwise."""

import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import devices_env, tiny_cfg

from zhgpt_jax import checkpoint as ckpt_lib
from zhgpt_jax import model as M
from zhgpt_jax import moe, parallel
from zhgpt_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOE = dict(position='rope', mlp='moe', norm='rmsnorm', bias=False)


def logits_and_grads(cfg, params, tokens):
  def loss(p):
    logits, aux = M.GPT(cfg).apply({'params': p}, tokens[:, :-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return jnp.mean(ce), (logits, aux['moe_load'])
  (_, (logits, load)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return (logits, grads), load


def assert_rel_close(a_tree, b_tree, rel=1e-5):
  for path, a, b in zip(jax.tree_util.tree_leaves_with_path(a_tree), jax.tree.leaves(a_tree),
                        jax.tree.leaves(b_tree)):
    a, b = np.asarray(a), np.asarray(b)
    scale = max(np.abs(b).max(), 1e-30)
    assert np.abs(a - b).max() <= rel * scale, (jax.tree_util.keystr(path[0]),
                                               np.abs(a - b).max() / scale)


SLOW = pytest.mark.slow   # the fast local loop keeps one case of each (CI runs them all)


@pytest.mark.parametrize('gate,shared,grouped', [
    pytest.param('softmax', 1, 'capacity', marks=SLOW), ('sigmoid', 0, 'capacity'),
    pytest.param('softmax', 0, 'ragged_dot', marks=SLOW), ('sigmoid', 2, 'ragged_dot')])
def test_sparse_equals_dense(gate, shared, grouped):
  """Logits and every gradient agree to 1e-5 (relative), including experts with no tokens."""
  moe_cfg = dict(n_routed=32, top_k=2, n_shared=shared, gate=gate, grouped=grouped,
                 capacity_factor=0)
  sparse = tiny_cfg(**MOE, n_layer=1, moe=moe_cfg)
  dense = tiny_cfg(**MOE, n_layer=1, moe=dict(moe_cfg, dispatch='dense'))
  params = M.init_params(sparse, jax.random.PRNGKey(1))
  # 12 tokens send 24 assignments to 32 experts: at least 8 experts get no token.
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 300, (2, 7)), jnp.int32)
  got, load = logits_and_grads(sparse, params, tokens)
  want, _ = logits_and_grads(dense, params, tokens)
  assert int((load == 0).sum()) >= 8
  assert_rel_close(got, want)


def test_capacity_drops_are_counted_and_zeroed():
  """With every token sent to experts 0 and 1 by the bias, each keeps C rows, drops the rest."""
  cfg = tiny_cfg(**MOE, moe=dict(n_routed=8, top_k=2, n_shared=0, balance='bias',
                                 grouped='capacity', capacity_factor=1.0))
  layer = M.MoE(cfg)
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 32, cfg.d_model))   # N = 64 tokens
  params = layer.init(jax.random.PRNGKey(0), x)['params']
  params['expert_bias'] = jnp.array([10.0, 10.0, 0, 0, 0, 0, 0, 0])
  c = moe.capacity(64, 8, 2, 1.0)
  assert c == moe.MIN_CAPACITY == 32
  y, aux = layer.apply({'params': params}, x)
  assert float(aux['dropped']) == (64 - c) * 2 / 128
  np.testing.assert_allclose(aux['load'][:2], 0.5)
  # The first C tokens keep both experts (the dense result), the rest get nothing routed.
  full, _ = M.MoE(tiny_cfg(**MOE, moe=dict(n_routed=8, top_k=2, n_shared=0, balance='bias',
                                           dispatch='dense'))).apply({'params': params}, x)
  np.testing.assert_allclose(y.reshape(64, -1)[:c], full.reshape(64, -1)[:c], atol=1e-6)
  np.testing.assert_array_equal(y.reshape(64, -1)[c:], 0.0)


@pytest.mark.parametrize('gate', ['softmax', 'sigmoid'])
def test_bias_moves_the_choice_not_the_gates(gate):
  logits = jax.random.normal(jax.random.PRNGKey(0), (32, 8))
  gates, idx, scores = moe.route(logits, None, 2, gate)
  bias = jnp.zeros(8).at[7].set(5.0)
  b_gates, b_idx, _ = moe.route(logits, bias, 2, gate)
  assert bool((b_idx == 7).any(axis=1).all()) and not bool((idx == 7).any(axis=1).all())
  raw = jnp.take_along_axis(scores, b_idx, axis=1)
  expected = raw / raw.sum(1, keepdims=True) if gate == 'sigmoid' else raw
  np.testing.assert_allclose(b_gates, expected, rtol=1e-6)
  # The bias gets no gradient: it only picks experts.
  g = jax.grad(lambda b: moe.route(logits, b, 2, gate)[0].sum())(bias)
  np.testing.assert_array_equal(g, 0.0)


def test_bias_update_steps_toward_equal_load():
  load = jnp.array([0.5, 0.25, 0.25, 0.0])
  np.testing.assert_allclose(moe.update_bias(jnp.zeros(4), load, 0.01), [-0.01, 0, 0, 0.01])
  assert moe.load_ratio([0.5, 0.25]) == 2.0 and moe.load_ratio([0.5, 0.0]) == float('inf')


def test_grouped_auto_picks_per_backend():
  assert moe.grouped_impl('auto', 'cpu') == 'capacity'
  assert moe.grouped_impl('auto', 'gpu') == 'ragged_dot'
  assert moe.grouped_impl('capacity', 'gpu') == 'capacity'


@pytest.mark.slow   # compiles the preset's layers twice, with gradients
def test_deepseek_preset_sparse_equals_dense():
  """configs/moe.py:deepseek's layers (MLA, 64 experts in 8 groups, scaled gates, the bias):
  sparse dispatch with a capacity that never drops gives dense dispatch's logits and
  gradients (1e-5, relative)."""
  from configs import moe as moe_configs
  c = moe_configs.get_config('deepseek')
  c.model.update(seq_len=16, vocab_size=0, vocab_multiple=64, n_layer=2)   # 1 dense, 1 MoE
  c.model.moe.capacity_factor = 0
  sparse = M.model_config(c.model, 300)
  assert sparse.attention_kind == 'mla' and sparse.moe.n_group == 8
  dense = dataclasses.replace(sparse, moe=dataclasses.replace(sparse.moe, dispatch='dense'))
  params = M.init_params(sparse, jax.random.PRNGKey(1))
  rng = np.random.default_rng(0)
  for i in sparse.moe_layers():   # a bias that changes the choice
    params[f'h_{i}']['moe']['expert_bias'] = jnp.asarray(rng.normal(0, 0.05, 64), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, 300, (2, 9)), jnp.int32)
  got, _ = logits_and_grads(sparse, params, tokens)
  want, _ = logits_and_grads(dense, params, tokens)
  assert_rel_close(got, want)


def test_group_limited_routing_chooses_in_the_best_groups_only():
  """n_group=4, topk_group=2: a token's experts come from the two groups whose best two
  (biased) scores sum highest; the gates are the unbiased scores, renormalised, x scale."""
  rng = np.random.default_rng(0)
  logits_NxE = jnp.asarray(rng.normal(0, 2, (64, 16)), jnp.float32)
  bias_E = jnp.asarray(rng.normal(0, 0.3, 16), jnp.float32)
  gate, idx, scores = moe.route(logits_NxE, bias_E, 3, 'sigmoid', norm_topk=True, scale=2.5,
                                n_group=4, topk_group=2)
  choice = np.asarray(scores) + np.asarray(bias_E)
  for n in range(64):
    group_score = np.sort(choice[n].reshape(4, 4), axis=1)[:, -2:].sum(1)
    kept = np.argsort(-group_score)[:2]
    allowed = np.concatenate([np.arange(4 * g, 4 * g + 4) for g in kept])
    want = allowed[np.argsort(-choice[n, allowed])[:3]]
    assert sorted(np.asarray(idx[n]).tolist()) == sorted(want.tolist())
    w = np.asarray(scores)[n, np.asarray(idx[n])]
    np.testing.assert_allclose(np.asarray(gate[n]), 2.5 * w / w.sum(), rtol=1e-6)


def test_first_dense_layers_and_active_counts():
  cfg = tiny_cfg(**MOE, n_layer=3, moe=dict(n_routed=8, top_k=2, first_dense=1, balance='bias'))
  assert cfg.moe_layers() == [1, 2]
  params = M.init_params(cfg, jax.random.PRNGKey(0))
  assert 'mlp' in params['h_0'] and params['h_1']['moe']['expert_bias'].shape == (8,)
  per_expert = 3 * cfg.d_model * cfg.moe.expert_hidden
  assert M.active_params(cfg, params) == M.count_params(params) - 2 * (6 * per_expert + 8)
  assert M.routed_flops_per_token(cfg) == 6 * 2 * 2 * per_expert


EP_SCRIPT = textwrap.dedent(r'''
    import re, tempfile
    import jax, numpy as np
    from zhgpt_jax import checkpoint, model as M, optim, parallel, train
    from zhgpt_jax.config import default_config
    import test_moe as T
    assert jax.device_count() == 8
    E, EXPERT = 8, 4
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 300, (16, 17)).astype(np.int32) for _ in range(3)]

    # A 2-layer DeepSeek-V3 in miniature (configs/moe.py:deepseek's pieces): multi-head
    # latent attention, the second layer a bias-balanced sigmoid MoE with scaled gates and
    # group-limited routing; Muon, as configs/moe.py.
    c = default_config('tiny')
    c.model.update(T.MOE, n_layer=2, n_head=4, d_model=64, seq_len=16, attention_kind='mla')
    c.model.mla.update(q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                       v_head_dim=16)
    c.model.moe.update(n_routed=E, top_k=2, gate='sigmoid', balance='bias', bias_rate=0.01,
                       capacity_factor=0, first_dense=1, routed_scale=2.5, n_group=2,
                       topk_group=1)
    c.optim.update(name='muon', lr=1e-2, warmup_steps=1)
    c.train.update(steps=10, loss_chunk=0)
    cfg = M.model_config(c.model, 300)
    opt = optim.make_optimizer(c.optim, 10)
    fresh = lambda r: train.new_state(opt, M.init_params(cfg, r), 0)
    make = lambda s: train.make_train_step(c, cfg, s)[1]   # the step training runs

    def put(strategy, b):   # [devices, accum, per-device batch, T + 1]
      x = b.reshape(strategy.local_devices, 1, 16 // strategy.local_devices, 17)
      return strategy.put_batch({'inputs': x[..., :-1], 'targets': x[..., 1:]})

    def steps(strategy, step, state, which):
      losses = []
      for b in which:
        state, m = step(state, put(strategy, b))
        losses.append(float(strategy.to_host(m['loss'])))
      return losses, state

    p = default_config().parallel
    p.update(strategy='fsdp', data=2, fsdp=1, expert=EXPERT)
    ep = parallel.make(p)
    one = parallel.Pmap(devices=tuple(jax.local_devices()[:1]))
    key = jax.random.PRNGKey(0)
    l1, s1 = steps(one, make(one), one.init_state(fresh, key), batches)
    step = make(ep)
    l8, s8 = steps(ep, step, ep.init_state(fresh, key), batches[:2])
    # Every expert stack of the train state, params and Muon's momentum, holds E / EXPERT
    # experts on each device (Adam's moments of them: tests/test_fsdp.py, the rule).
    stacks = [(jax.tree_util.keystr(k), x) for k, x in jax.tree_util.tree_leaves_with_path(s8)
              if re.search(r"\['moe'\]\['w_(gate|up|down)'\]$", jax.tree_util.keystr(k))]
    assert len(stacks) == 3 * 2, [k for k, _ in stacks]
    for name, x in stacks:
      assert x.sharding.spec[0] == 'expert', (name, x.sharding)
      assert {s.data.shape for s in x.addressable_shards} == {(E // EXPERT, *x.shape[1:])}, name
    # The compiled step: each device runs its E / EXPERT experts on its half (data=2) of their
    # capacity rows (C = all 256 tokens at capacity_factor 0): the forward matmul's [E, C, F]
    # blocks. The rows travel between devices by all-to-alls.
    hlo = step.lower(s8, put(ep, batches[2])).compile().as_text()
    blocks = {(m[0], 'transpose(' in m[1]) for m in re.findall(
        r'= f32\[([\d,]+)\]\S* dot\(.*op_name="([^"]*/moe/ecd,edf->ecf/dot_general)"', hlo)}
    forward = {b for b, backward in blocks if not backward}
    assert forward == {f'{E // EXPERT},{16 * 16 // 2},{cfg.moe.expert_hidden}'}, blocks
    assert re.search(r' all-to-all\(.*op_name="[^"]*/moe/', hlo), 'no all-to-all in the MoE layer'
    # Saved at step 2 and restored in this layout, bit for bit; step 3 from there.
    with tempfile.TemporaryDirectory() as d:
      ckpt = checkpoint.Checkpointer(d, keep=1, async_save=False)
      ckpt.save(2, ep.savable(s8), None, {'step': 2})
      restored, _ = ckpt.restore(2, ep.restore_target(jax.eval_shape(fresh, key)))
      ckpt.close()
    for x, y in zip(jax.tree.leaves(s8), jax.tree.leaves(restored)):
      assert y.sharding.is_equivalent_to(x.sharding, x.ndim), (x.sharding, y.sharding)
      np.testing.assert_array_equal(x, y)
    l8b, s8 = steps(ep, step, restored, batches[2:])
    print('one device', l1, f'data=2 x expert={EXPERT}', l8 + l8b)
    np.testing.assert_allclose(l8 + l8b, l1, rtol=1e-5)
    p1, p8 = one.to_host(s1['params']), ep.to_host(s8['params'])
    T.assert_rel_close(p8, p1)
    assert np.abs(p1['h_1']['moe']['expert_bias']).max() > 0, 'the bias never moved'
    np.testing.assert_array_equal(p8['h_1']['moe']['expert_bias'],
                                  p1['h_1']['moe']['expert_bias'])
    print('OK')
''')


@pytest.mark.multiprocess
def test_expert_parallel_training_equals_one_device():
  """The train step under parallel.strategy=fsdp with data=2 x expert=4 (8 simulated devices),
  MLA and a bias-balanced sigmoid MoE (DeepSeek-V3's router) under Muon: 3 steps, resumed from a checkpoint of step 2, give
  the 1-device losses, params and expert bias; each device holds 2 of the 8 experts of every
  expert stack (params and momentum); the MoE layer exchanges rows by all-to-all."""
  # Backend optimisations off (both runs alike): the compiles take a third less time.
  env = devices_env(8, '--xla_backend_optimization_level=0 '
                    '--xla_llvm_disable_expensive_passes=true')
  out = subprocess.run([sys.executable, '-c', EP_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0 and 'OK' in out.stdout, out.stdout + out.stderr[-3000:]


@SLOW
def test_bias_balanced_resume_is_bitwise(tiny_data, tmp_path):
  config = copy.deepcopy(tiny_data.config)
  config.data.cache_dir = tiny_data.data_dir
  config.model.update(MOE, mlp='moe', attention_kind='mla')   # DeepSeek-V3's pieces
  config.model.moe.update(n_routed=8, top_k=2, balance='bias', bias_rate=0.01, first_dense=1,
                          gate='sigmoid', routed_scale=2.5, n_group=2, topk_group=1)
  config.train.update(steps=6, ckpt_every=3, eval_every=100, sample_tokens=0, log_every=1)
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  result = train.train_and_evaluate(config, straight)
  assert 1.0 <= result['moe_max_min_l1'] < 1e9   # over the val split, the last eval's
  # The run as it stood at step 3 (its step-6 checkpoint removed), resumed to step 6,
  # logging once for steps 4-6.
  shutil.copytree(straight, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '6'))
  config.train.log_every = 3
  train.train_and_evaluate(config, resumed)
  _, a, _ = ckpt_lib.load_params(str(tmp_path / 'straight'))
  _, b, meta = ckpt_lib.load_params(str(tmp_path / 'resumed'))
  assert meta['step'] == 6
  bias = np.asarray(a['h_1']['moe']['expert_bias'])
  assert np.abs(bias).max() > 0, 'the bias never moved'
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  # The logged load is the mean over the steps since the last log, not the last step's.
  def loads(workdir):
    records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
    return {r['step']: np.array([r[f'moe_load_l1_e{e}'] for e in range(8)])
            for r in records if 'moe_load_l1_e0' in r}
  each, window = loads(straight), loads(resumed)
  assert sorted(window) == [1, 2, 3, 6] and not np.allclose(each[4], each[6])
  np.testing.assert_allclose(window[6], (each[4] + each[5] + each[6]) / 3, rtol=1e-6)


@SLOW
def test_eval_reports_each_layers_load_over_the_split():
  """The val record's moe_max_min_l{layer} is max/min of the loads summed over all batches."""
  cfg = tiny_cfg(**MOE, n_layer=2, moe=dict(n_routed=8, top_k=2, first_dense=1))
  params = M.init_params(cfg, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  batches = [{'inputs': rng.integers(0, 300, (1, 3, 16)).astype(np.int32),
              'targets': rng.integers(0, 300, (1, 3, 16)).astype(np.int32),
              'weights': np.ones((1, 3, 16), np.float32)} for _ in range(3)]
  got = train.evaluate(train.make_eval_step(cfg), parallel.replicate(params), batches, None,
                       moe_layers=cfg.moe_layers())
  load_of = jax.jit(lambda x: M.GPT(cfg).apply({'params': params}, x)[1]['moe_load'][0])
  load = sum(np.asarray(load_of(b['inputs'][0])) for b in batches)
  assert set(got) >= {'loss', 'moe_max_min_l1'} and 'moe_max_min_l0' not in got
  np.testing.assert_allclose(got['moe_max_min_l1'], load.max() / load.min(), rtol=1e-5)


def test_a_run_saved_before_the_moe_keys_resumes_only_as_their_defaults():
  import ml_collections
  from zhgpt_jax.config import UserError, default_config
  saved = default_config().to_dict()
  del saved['model']['moe']['balance'], saved['model']['moe']['first_dense']
  saved = ml_collections.ConfigDict(saved)
  gpt = lambda c: M.model_config(c.model, 1000)   # what resume compares: the two GPTConfigs
  ckpt_lib.check_compatible(gpt(saved), gpt(default_config()), 'h', 'h')
  config = default_config()
  config.model.moe.balance = 'bias'
  with pytest.raises(UserError, match="model.moe.balance: 'aux' -> 'bias'"):
    ckpt_lib.check_compatible(gpt(saved), gpt(config), 'h', 'h')
