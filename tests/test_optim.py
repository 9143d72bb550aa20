import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from zhgpt_jax import model as M
from zhgpt_jax import optim
from zhgpt_jax.config import default_config


def optim_cfg(**kw):
  c = default_config('tiny').optim
  c.update({**dict(lr=6e-4, warmup_steps=100, min_lr_ratio=0.1), **kw})
  return c


def test_schedule_warmup_peak_and_floor():
  s = optim.schedule(optim_cfg(), total_steps=1000)
  assert float(s(0)) == 0.0
  assert float(s(50)) == pytest.approx(3e-4)
  assert float(s(100)) == pytest.approx(6e-4)
  # The floor is a fraction of the peak, not optax's absolute end_value default of 0.
  assert float(s(1000)) == pytest.approx(6e-5)
  assert float(s(550)) == pytest.approx(6e-5 + 0.5 * (6e-4 - 6e-5), rel=1e-5)
  assert float(s(5000)) == pytest.approx(6e-5)


def test_wsd_schedule_holds_then_decays_linearly():
  s = optim.schedule(optim_cfg(schedule='wsd', decay_fraction=0.4, min_lr_ratio=0.0),
                     total_steps=1000)
  assert float(s(50)) == pytest.approx(3e-4)
  assert [float(s(i)) for i in (100, 400, 600)] == pytest.approx([6e-4] * 3)   # stable
  assert float(s(800)) == pytest.approx(3e-4, rel=1e-5)     # halfway through the last 400
  assert float(s(1000)) == 0.0 and float(s(5000)) == 0.0
  # decay_fraction=1: linear from the end of warmup to the floor.
  s = optim.schedule(optim_cfg(schedule='wsd', decay_fraction=1.0), total_steps=1000)
  assert float(s(100)) == pytest.approx(6e-4)
  assert float(s(550)) == pytest.approx((6e-4 + 6e-5) / 2, rel=1e-5)
  assert float(s(1000)) == pytest.approx(6e-5)


def test_weight_decay_only_on_matrices():
  c = default_config('tiny')
  c.model.update(n_layer=1, d_model=32, n_head=2, seq_len=16)
  params = M.init_params(M.model_config(c.model, 100), jax.random.PRNGKey(0))
  mask = optim.decay_mask(params)
  assert mask['h_0']['attn']['q']['kernel'] and mask['h_0']['mlp']['fc']['kernel']
  assert not mask['h_0']['attn']['q']['bias'] and not mask['h_0']['ln_1']['scale']
  assert not mask['ln_f']['bias'] and not mask['wte']['embedding'] and not mask['wpe']['embedding']
  assert optim.decay_mask(params, decay_embeddings=True)['wte']['embedding']


def test_adamw_decays_masked_leaves_only():
  params = {'w': jnp.ones((2, 2)), 'b': jnp.ones((2,))}
  opt = optim.make_optimizer(optim_cfg(warmup_steps=0, weight_decay=0.5, grad_clip=0.0), 10)
  state = opt.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  # Warmup 0 starts at the peak rate; zero gradients leave only the decay.
  updates, _ = opt.update(zero, state, params)
  np.testing.assert_allclose(updates['w'], -6e-4 * 0.5 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_allclose(updates['b'], 0.0)


def test_clipping_bounds_update_direction():
  opt = optim.make_optimizer(optim_cfg(grad_clip=1.0, weight_decay=0.0), 1000)
  params = {'w': jnp.zeros(4)}
  state = opt.init(params)
  clip = optax.clip_by_global_norm(1.0)
  g = {'w': jnp.array([30.0, 40.0, 0.0, 0.0])}
  clipped, _ = clip.update(g, clip.init(params))
  assert float(optax.global_norm(clipped)) == pytest.approx(1.0)
  updates, _ = opt.update(g, state, params)
  assert np.all(np.isfinite(updates['w']))


def test_muon_orthogonalises_block_matrices_and_adams_the_rest():
  c = default_config('tiny')
  c.model.update(n_layer=2, d_model=32, n_head=2, seq_len=16, mlp='moe')
  c.model.moe.update(n_routed=4, top_k=2, every=2, expert_hidden=16)      # h_1 is an MoE layer
  params = M.init_params(M.model_config(c.model, 100), jax.random.PRNGKey(0))
  dims = optim.muon_dims(params)
  assert dims['h_0']['attn']['q']['kernel'] == optax.contrib.MuonDimensionNumbers(0, 1)
  assert dims['h_1']['moe']['w_up'] == optax.contrib.MuonDimensionNumbers(1, 2)  # [E, D, F]
  for top, leaf in (('wte', 'embedding'), ('wpe', 'embedding'), ('ln_f', 'scale')):
    assert dims[top][leaf] is None
  assert dims['h_0']['attn']['q']['bias'] is None

  cfg = optim_cfg(name='muon', lr=1e-3, muon_lr=0.02, warmup_steps=0, weight_decay=0.0,
                  grad_clip=0.0)
  opt = optim.make_optimizer(cfg, 10)
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
  updates, _ = jax.jit(opt.update)(grads, opt.init(params), params)   # one program, not ~1k ops
  # Muon: the update of a block matrix has its singular values near muon_lr (Newton-Schulz
  # only approximates the orthogonal factor: its quintic maps them into ~[0.7, 1.2], all but
  # the tiniest of a random square gradient's).
  sv = np.linalg.svd(np.asarray(updates['h_0']['attn']['q']['kernel']), compute_uv=False)
  assert np.mean((sv > 0.5 * 0.02) & (sv < 1.3 * 0.02)) >= 0.9 and sv.max() < 1.3 * 0.02
  up = np.asarray(updates['h_0']['mlp']['up']['kernel'])      # 32 x 128: scaled by sqrt(128/32)
  sv = np.linalg.svd(up, compute_uv=False)
  assert np.all(sv > 0.5 * 0.04) and np.all(sv < 1.3 * 0.04)
  for e in range(4):      # each expert's [16, 32] down-projection on its own: x sqrt(32/16)
    sv = np.linalg.svd(np.asarray(updates['h_1']['moe']['w_down'][e]), compute_uv=False)
    assert np.all(sv > 0.5 * 0.02 * 2**0.5) and np.all(sv < 1.3 * 0.02 * 2**0.5), (e, sv)
  # Orthogonalised per expert, not as one [4·16, 32] matrix (whose singular values would be
  # ~2x larger for the same Frobenius-normalised update).
  stacked = np.asarray(updates['h_1']['moe']['w_down']).reshape(64, 32)
  assert np.linalg.svd(stacked, compute_uv=False).max() > 1.5 * 0.02 * 2**0.5
  # Adam on the rest: its first (Nesterov) step moves each coordinate by ~lr against the sign.
  emb_u, emb_g = np.asarray(updates['wte']['embedding']), np.asarray(grads['wte']['embedding'])
  assert np.all(np.sign(emb_u) == -np.sign(emb_g))
  assert np.abs(emb_u).max() < 2e-3 and np.median(np.abs(emb_u)) > 5e-4


def test_a_run_shorter_than_its_warmup_is_all_warmup():
  # A 20-step smoke run of a config with 100 warmup steps: a linear rise that ends at 19%.
  for schedule in ('cosine', 'wsd'):
    s = optim.schedule(optim_cfg(schedule=schedule), total_steps=20)
    assert [float(s(i)) for i in (0, 10, 19)] == pytest.approx([0.0, 6e-5, 1.14e-4])
  assert validate_ok(warmup_steps=100, steps=20)


def validate_ok(warmup_steps: int, steps: int) -> bool:
  from zhgpt_jax.config import default_config, validate
  c = default_config('tiny')
  c.optim.warmup_steps, c.train.steps = warmup_steps, steps
  validate(c)          # raises UserError if refused
  return True
