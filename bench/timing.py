"""How the benches time things: wall seconds by time.perf_counter, over interleaved rounds.

`interleaved` runs every candidate once per round, in turn, so that on a shared machine load
from elsewhere hits all of them alike (ratios are measured side by side, never across runs);
`Timer` times one block. Device work must be waited for inside the timed function
(`jax.block_until_ready`), or the timer measures the dispatch only.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence


class Timer:
  """`with Timer() as t: ...` -> t.seconds."""

  def __enter__(self) -> 'Timer':
    self.seconds, self._t0 = float('nan'), time.perf_counter()
    return self

  def __exit__(self, *exc) -> None:
    self.seconds = time.perf_counter() - self._t0


def interleaved(fns: Sequence[Callable[[], object]], rounds: int,
                warmup: bool = True) -> list[list[float]]:
  """Each function's wall seconds in each of `rounds` rounds (one call of each per round, in
  turn), after one untimed call each when `warmup` (compilation and first-touch allocations
  stay out of the timing)."""
  if warmup:
    for fn in fns:
      fn()
  times: list[list[float]] = [[] for _ in fns]
  for _ in range(rounds):
    for i, fn in enumerate(fns):
      with Timer() as t:
        fn()
      times[i].append(t.seconds)
  return times
