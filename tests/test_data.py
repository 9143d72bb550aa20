import json
import os

import numpy as np
import pytest

from zhgpt_jax import data
from zhgpt_jax.config import UserError

T = 8


def write_split(directory, sizes, dtype='uint16'):
  """Shards holding 0, 1, 2, ... consecutively, so a window is known by its first token."""
  os.makedirs(directory, exist_ok=True)
  start = 0
  for i, n in enumerate(sizes):
    np.arange(start, start + n, dtype=dtype).tofile(os.path.join(directory, f'shard_{i:05d}.bin'))
    start += n
  with open(os.path.join(directory, 'meta.json'), 'w') as f:
    json.dump({'dtype': dtype, 'tokens': start}, f)
  return str(directory)


def loader(split, **kw):
  args = dict(per_device_batch=2, grad_accum=1, local_devices=2, seed=0, process_index=0,
              process_count=1)
  args.update(kw)
  return data.train_loader(split, T, **args)


def first_tokens(batch):
  return sorted(batch['inputs'][..., 0].ravel().tolist())


def test_windows_span_shards(tmp_path):
  split = write_split(tmp_path / 'train', [50, 7, 43])
  src = data.TokenWindows(split, T)
  assert len(src) == (100 - 1) // T
  for i in range(len(src)):
    np.testing.assert_array_equal(src[i], np.arange(i * T, i * T + T + 1))


def test_batches_shape_targets_and_determinism(tmp_path):
  split = write_split(tmp_path / 'train', [1000])
  a, b, c = iter(loader(split)), iter(loader(split)), iter(loader(split, seed=1))
  batch = next(a)
  assert batch['inputs'].shape == (2, 1, 2, T) and batch['inputs'].dtype == np.int32
  np.testing.assert_array_equal(batch['targets'], batch['inputs'] + 1)
  np.testing.assert_array_equal(batch['inputs'] % T, np.broadcast_to(np.arange(T), (2, 1, 2, T)))
  same = [batch] + [next(a) for _ in range(4)]
  again = [next(b) for _ in range(5)]
  other = [next(c) for _ in range(5)]
  assert [first_tokens(x) for x in same] == [first_tokens(x) for x in again]
  assert [first_tokens(x) for x in same] != [first_tokens(x) for x in other]


def test_processes_read_disjoint_windows(tmp_path):
  split = write_split(tmp_path / 'train', [8 * 64 + 1])
  seen = []
  for p in range(2):
    it = iter(loader(split, process_index=p, process_count=2, local_devices=1))
    seen.append({t for _ in range(16) for t in first_tokens(next(it))})   # one epoch each
  assert len(seen[0]) == len(seen[1]) == 32
  assert not seen[0] & seen[1]
  assert len(seen[0] | seen[1]) == 64


def test_iterator_state_resumes_same_order(tmp_path):
  split = write_split(tmp_path / 'train', [2000])
  it = iter(loader(split))
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [first_tokens(next(it)) for _ in range(4)]
  fresh = iter(loader(split))
  fresh.set_state(state)
  assert [first_tokens(next(fresh)) for _ in range(4)] == expected


@pytest.mark.parametrize('processes', [1, 3])
def test_val_covers_every_target_once(tmp_path, processes):
  n = 203
  split = write_split(tmp_path / 'val', [100, 103])
  targets = []
  batches = [list(data.eval_batches(split, T, batch=3, local_devices=2, process_index=p,
                                    process_count=processes)) for p in range(processes)]
  assert len({len(b) for b in batches}) == 1   # every process runs the same number of steps
  for per_process in batches:
    for b in per_process:
      targets += b['targets'][b['weights'] > 0].tolist()
      np.testing.assert_array_equal(b['targets'][b['weights'] > 0] - 1,
                                    b['inputs'][b['weights'] > 0])
  assert sorted(targets) == list(range(1, n))


def test_too_small_split_is_a_clear_error(tmp_path):
  split = write_split(tmp_path / 'train', [5])
  with pytest.raises(UserError, match='fewer than one window'):
    data.TokenWindows(split, T)
  with pytest.raises(UserError, match='no meta.json'):
    data.TokenWindows(str(tmp_path / 'missing'), T)
  split = write_split(tmp_path / 'small', [40])
  with pytest.raises(UserError, match='cannot fill one global batch'):
    loader(split, per_device_batch=8)


def test_global_batch_is_the_same_for_any_process_layout(tmp_path):
  split = write_split(tmp_path / 'train', [3000])
  one = iter(loader(split, local_devices=4, process_count=1))
  two = [iter(loader(split, local_devices=2, process_index=p, process_count=2)) for p in range(2)]
  for _ in range(60):   # past an epoch boundary (374 windows, 46 global batches of 8)
    whole = next(one)['inputs']
    halves = np.concatenate([next(it)['inputs'] for it in two], axis=0)
    np.testing.assert_array_equal(whole, halves)


def write_sources(directory, sizes, start=100_000):
  """One shard per source; source s holds tokens from s * start on."""
  os.makedirs(directory, exist_ok=True)
  shards, groups = [], []
  for s, n in enumerate(sizes):
    name = f'shard_{s:05d}.bin'
    np.arange(s * start, s * start + n, dtype='uint32').tofile(os.path.join(directory, name))
    shards.append(dict(name=name, tokens=n, source=s))
    groups.append(dict(name=f'src{s}', tokens=n))
  with open(os.path.join(directory, 'meta.json'), 'w') as f:
    json.dump({'dtype': 'uint32', 'tokens': sum(sizes), 'shards': shards,
               'source_groups': groups}, f)
  return str(directory)


def test_weighted_sources_mix_in_proportion_and_resume(tmp_path):
  split = write_sources(tmp_path / 'train', [3000, 9000])   # the small source weighs 2
  it = iter(loader(split, weights=[2 / 3, 1 / 3]))
  counts = np.zeros(2)
  for step in range(1000):
    batch = next(it)
    src = batch['inputs'][..., 0].ravel() // 100_000
    counts += np.bincount(src, minlength=2)
    # a window never straddles two sources
    assert ((batch['inputs'] // 100_000) == (batch['inputs'][..., :1] // 100_000)).all()
    if step == 500:
      state = it.get_state()
      expected = [first_tokens(next(it)) for _ in range(3)]
      fresh = iter(loader(split, weights=[2 / 3, 1 / 3]))
      fresh.set_state(state)
      assert [first_tokens(next(fresh)) for _ in range(3)] == expected
  share = counts / counts.sum()
  assert abs(share[0] - 2 / 3) < 0.02 * 2 / 3 and abs(share[1] - 1 / 3) < 0.02 * 1 / 3
  lines = data.epoch_report(split, [2 / 3, 1 / 3], tokens_per_step=4 * T, steps=1000)
  assert lines[0].startswith('data: source src0: 3,000 tokens, 66.7% of the windows, 7.1')
  assert not any(l.startswith('warning') for l in lines)
  lines = data.epoch_report(split, [2 / 3, 1 / 3], tokens_per_step=4 * T, steps=2000)
  assert lines[-1].startswith('warning: this run reads source src0 14 times (> 10 epochs)')


def test_unweighted_report_warns_on_many_epochs(tmp_path):
  split = write_split(tmp_path / 'train', [1000])
  lines = data.epoch_report(split, None, tokens_per_step=100, steps=50)
  assert lines == ['data: 50 steps x 100 tokens = 5,000 tokens, 5.00 epochs of the '
                   '1,000-token train split']
  assert data.epoch_report(split, None, 100, 200)[-1].startswith(
      'warning: this run reads the train split 20 times (> 10 epochs)')
