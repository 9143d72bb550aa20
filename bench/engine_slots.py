"""One live request's decode step on engines of different slot counts, interleaved.

  python bench/engine_slots.py [--slots 1,16] [--chunk 8] [--rounds 40]

The engine's decode program (engine_steps.decode) on a random-init 'tiny' GPT-2 (seq_len 256,
vocab 4000): one live row gathered into a batch of 1 out of B slots, `chunk` steps a call;
the engines take turns call by call, so both see the same machine load. Prints ms per step
(median and best): with live rows compacted, B should not matter.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from zhgpt_jax import engine, engine_steps, sample  # pylint: disable=wrong-import-position
from zhgpt_jax import model as model_lib  # pylint: disable=wrong-import-position
from zhgpt_jax.config import default_config  # pylint: disable=wrong-import-position
import timing  # pylint: disable=import-error,wrong-import-position  (bench/ is on sys.path)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--slots', default='1,16')
  parser.add_argument('--chunk', type=int, default=8)
  parser.add_argument('--rounds', type=int, default=40)
  args = parser.parse_args()
  c = default_config('tiny')
  c.model.seq_len = 256
  cfg = model_lib.model_config(c.model, 4000)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  stops = sample.stop_array([])
  opts = engine._options([engine.Request([1, 2, 3], 10**6, None)])  # pylint: disable=protected-access

  def fresh(b):   # one request prefilled into slot 0 of b
    state = engine_steps.init_state(cfg, b)
    return engine_steps.prefill(cfg, 20, params, state, np.zeros(1, np.int32),
                                np.ones((1, 16), np.int32), np.array([3], np.int32), opts,
                                stops)[0]

  def step(b, state):
    state, out = engine_steps.decode(cfg, args.chunk, 20, params, state,
                                     np.zeros(1, np.int32), stops, np.zeros(b, bool),
                                     np.bool_(False), np.int32(args.chunk))
    jax.device_get(out['token'])
    return state

  slots = [int(x) for x in args.slots.split(',')]
  states = {b: step(b, fresh(b)) for b in slots}   # compiles
  times = {b: [] for b in slots}
  for r in range(args.rounds):
    for b in slots:
      if r % 8 == 0:   # stay clear of the context's end
        states[b] = fresh(b)
      with timing.Timer() as t:
        states[b] = step(b, states[b])
      times[b].append(t.seconds / args.chunk * 1e3)
  print(f'load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores')
  print('\n| slots | ms/step median | ms/step best |\n|---:|---:|---:|')
  for b in slots:
    print(f'| {b} | {np.median(times[b]):.3f} | {np.min(times[b]):.3f} |')


if __name__ == '__main__':
  main()
