"""Data parallelism: the pmapped step on 4 simulated devices equals 1 device, same global batch."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent('''
    import jax, numpy as np
    from zhgpt_jax import model as M, optim, train
    from zhgpt_jax.config import default_config
    assert jax.local_device_count() == 4
    c = default_config('tiny')
    c.model.update(n_layer=2, n_head=4, d_model=64, seq_len=16)
    c.optim.update(lr=1e-2, warmup_steps=1)
    cfg = M.model_config(c.model, 200)
    model, opt = M.GPT(cfg), optim.make_optimizer(c.optim, 10)
    params = M.init_params(cfg, jax.random.PRNGKey(0))
    state = train.new_state(opt, params, 0)
    step = train.make_train_step(model, opt, optim.schedule(c.optim, 10), c.model.moe)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 200, (8, 17)).astype(np.int32) for _ in range(3)]

    def run(n):
      s = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)).copy(), state)
      losses = []
      for b in batches:
        x = b.reshape(n, 1, 8 // n, 17)   # [devices, accum, per-device batch, T + 1]
        s, m = step(s, {'inputs': x[..., :-1], 'targets': x[..., 1:]})
        losses.append(float(np.asarray(m['loss'])[0]))
      return losses, jax.tree.map(lambda x: np.asarray(x)[0], s['params'])

    l1, p1 = run(1)
    l4, p4 = run(4)
    print('losses', l1, l4)
    np.testing.assert_allclose(l1, l4, rtol=1e-5)
    flat1 = np.concatenate([x.ravel() for x in jax.tree.leaves(p1)])
    flat4 = np.concatenate([x.ravel() for x in jax.tree.leaves(p4)])
    print('param rel diff', np.linalg.norm(flat1 - flat4) / np.linalg.norm(flat1))
    assert np.linalg.norm(flat1 - flat4) <= 1e-5 * np.linalg.norm(flat1)
    # Elementwise too, with an absolute floor: the key bias has a zero true gradient (softmax
    # ignores a shift shared by all keys), so Adam turns its float noise into ~1e-5 steps.
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=3e-5)
    print('OK')
''')


def test_four_devices_match_one_device():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', SCRIPT], env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'OK' in out.stdout
