"""The process pool that reads and tokenizes on every core: `prepare`'s two passes (scan,
encode) and the SFT rows (sft_shards) submit their blocks to it.

Workers are spawned (not forked) with the data config and, for tokenizing, the tokenizer; a
worker function reads them with `worker_state()`. No JAX: the workers import this module.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import multiprocessing
import os
import types
from typing import Callable, Iterator

from zhgpt_jax.config import UserError

_STATE: dict = {}   # a worker's data config and tokenizer, set by _init


def _init(data: dict, tok_json: str | None, serial_rust: bool) -> None:
  if serial_rust:
    # One process per core already: a Rust thread pool per worker would only oversubscribe.
    os.environ['TOKENIZERS_PARALLELISM'] = 'false'
  _STATE['data'] = types.SimpleNamespace(**data)
  if tok_json is not None:
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
    from zhgpt_jax import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
    _STATE['tok'] = tokenizer_lib.as_plain_text(Tokenizer.from_str(tok_json))


def worker_state() -> dict:
  """{'data': the data config, 'tok': the plain-text tokenizer} in a pool worker."""
  return _STATE


def workers(config) -> int:
  """How many processes read and tokenize: config.data.tokenize_workers, 0 = every core."""
  if config.data.tokenize_workers < 0:
    raise UserError(f'config.data.tokenize_workers={config.data.tokenize_workers}: must be >= 0')
  return config.data.tokenize_workers or os.cpu_count() or 1


@contextlib.contextmanager
def worker_pool(config, tok_json: str | None = None) -> Iterator[Callable]:
  """Yields submit(fn, *args) -> a callable returning fn(*args), run by `workers(config)`
  spawned processes (1: a thread of this process, the Rust tokenizer on every core)."""
  n, data = workers(config), config.data.to_dict()
  if n == 1:
    _init(data, tok_json, serial_rust=False)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      yield lambda fn, *args: pool.submit(fn, *args).result
    return
  # spawn, not fork: the caller may have started JAX's threads, and a forked copy of a
  # multithreaded process can deadlock.
  with multiprocessing.get_context('spawn').Pool(n, _init, (data, tok_json, True)) as pool:
    yield lambda fn, *args: pool.apply_async(fn, args).get


def ordered(submit: Callable, fn: Callable, jobs, depth: int) -> Iterator[tuple]:
  """(job, fn(*job's args)) for `jobs` of (job, args), in order, at most `depth` in flight,
  so memory does not grow with the corpus."""
  in_flight = collections.deque()
  for job, args in jobs:
    in_flight.append((job, submit(fn, *args)))
    if len(in_flight) > depth:
      job, result = in_flight.popleft()
      yield job, result()
  while in_flight:
    job, result = in_flight.popleft()
    yield job, result()
