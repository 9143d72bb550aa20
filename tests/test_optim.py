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
