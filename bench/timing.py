"""How the benches time things: wall seconds by time.perf_counter, over interleaved rounds.

`interleaved` runs every candidate once per round, in turn, so that on a shared machine load
from elsewhere hits all of them alike (ratios are measured side by side, never across runs);
`Timer` times one block (wall and CPU seconds); every bench times with these. Device work must be waited for inside the timed function
(`jax.block_until_ready`), or the timer measures the dispatch only.
"""

from __future__ import annotations

import resource
import time
from typing import Callable, Sequence


def children_cpu_seconds() -> float:
  """User + system CPU seconds of this process's waited-for children (and theirs): taken before
  and after a child command, the work it did, which a busy machine's load stretches far less
  than its wall time."""
  r = resource.getrusage(resource.RUSAGE_CHILDREN)
  return r.ru_utime + r.ru_stime


class Timer:
  """`with Timer() as t: ...` -> t.seconds (wall) and t.cpu_seconds (this process's CPU time);
  inside the block, t.elapsed() is the wall seconds so far (a first token, a progress line)."""

  def start(self) -> 'Timer':
    """Starts the clock (what `with` does); for a clock read by elapsed() across a loop."""
    self.seconds = self.cpu_seconds = float('nan')
    self._t0, self._c0 = time.perf_counter(), time.process_time()
    return self

  def __enter__(self) -> 'Timer':
    return self.start()

  def elapsed(self) -> float:
    return time.perf_counter() - self._t0

  def __exit__(self, *exc) -> None:
    self.seconds = time.perf_counter() - self._t0
    self.cpu_seconds = time.process_time() - self._c0


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
