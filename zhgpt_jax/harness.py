"""EleutherAI's lm-evaluation-harness (lm_eval) on our model, in-process: `main.py eval --tasks`.

`harness_lm` is an lm_eval model (its registered-model API, `TemplateLM`) whose
`loglikelihood`, `loglikelihood_rolling` and `generate_until` run our jitted code on
batches: scoring through `score.score_rows` (rows of every request batched by length bucket,
one forward pass for the choices that share a context, the head only at the continuation's
positions), generation through `sample.generate`. No HTTP, no export.
Its requests are built as lm_eval's HuggingFace model (`--model hf`) builds them: the same
tokenization, left truncation to the model's context, rolling windows and stop handling,
so its numbers are `lm_eval --model hf`'s on the export (the tests check this).

`evaluate_tasks` runs tasks by name (lm_eval's own, ours in zhgpt_jax/lm_tasks, or a
directory of the user's YAML), prints lm_eval's table and writes lm_eval's results JSON
(and the per-item samples) under `<workdir>/lm_eval/`.

lm_eval is optional: without it these functions raise one UserError naming the pip command.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from unittest import mock

import numpy as np

from zhgpt_jax import files
from zhgpt_jax import eval_tasks, pretrained, sample, score
from zhgpt_jax import tokenizer as tok_lib
from zhgpt_jax.config import UserError

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'lm_tasks')
INSTALL = 'pip install "lm_eval>=0.4.8"'


def require_lm_eval():
  """The lm_eval module, or UserError naming the pip command."""
  try:
    import lm_eval  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UserError(f'--tasks needs EleutherAI\'s lm-evaluation-harness: {INSTALL}') from None
  return lm_eval


@functools.cache
def _lm_class():
  """The TemplateLM subclass, built on first use so that importing this module needs no lm_eval."""
  require_lm_eval()
  from lm_eval import utils as lm_utils
  from lm_eval.api.model import TemplateLM
  from lm_eval.models.utils import (handle_stop_sequences, normalize_gen_kwargs,
                                    postprocess_generated_text)
  from tqdm import tqdm

  class ZhgptLM(TemplateLM):
    """Our model as an lm_eval model. `max_length` defaults to the model's context."""

    def __init__(self, cfg, params, tokenizer, *, max_length: int | None = None,
                 batch_tokens: int | None = None, generate_batch: int = 32):
      super().__init__()
      self.cfg, self.params, self.tokenizer = cfg, params, tokenizer
      self.max_length = max_length or cfg.seq_len
      self.batch_tokens, self.generate_batch = batch_tokens, generate_batch
      self.ids = tok_lib.special_ids(tokenizer)
      # The choices of a question share its context: it is encoded once, not once a choice.
      self._encode = functools.lru_cache(maxsize=4096)(
          lambda text, special: tuple(tokenizer.encode(text, add_special_tokens=special).ids))

    @property
    def eot_token_id(self) -> int:
      return self.ids.eos

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs):
      # As HF's tokenizer.encode: the tokenizer's post-processor runs unless told not to.
      return list(self._encode(string, add_special_tokens is not False))

    def tok_decode(self, ids, skip_special_tokens: bool = True) -> str:
      return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
      """(sum of the continuation's log-probs, whether each is the greedy token) a request."""
      rows = [(ctx + cont)[-(self.max_length + 1):] for _, ctx, cont in requests]
      bar = tqdm(total=len(rows), desc='scoring', disable=disable_tqdm)
      # Only the continuation's tokens are scored (a continuation longer than the context
      # window keeps its last max_length tokens, as --model hf's).
      out = score.score_rows(self.cfg, self.params, rows, tokens=self.batch_tokens,
                             tails=[min(len(cont), len(row) - 1)
                                    for (_, _, cont), row in zip(requests, rows)],
                             done=bar.update)
      bar.close()
      scored = []
      for (key, _, _), s in zip(requests, out):
        answer = (float(np.sum(s.logprobs, dtype=np.float64)), bool(s.greedy.all()))
        scored.append(answer)
        if key is not None:
          self.cache_hook.add_partial('loglikelihood', key, answer)
      return scored

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
      """Each text's total log-likelihood over lm_eval's disjoint windows of max_length."""
      windows, owner = [], []
      for i, (text,) in enumerate(r.args for r in requests):
        for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
            token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
            max_seq_len=self.max_length, context_len=1)):
          windows.append((None, ctx, cont))
          owner.append(i)
      totals = [0.0] * len(requests)
      for i, (lp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
        totals[i] += lp
      for r, total in zip(requests, totals):
        self.cache_hook.add_partial('loglikelihood_rolling', r.args, total)
      return totals

    def generate_until(self, requests, disable_tqdm: bool = False):
      """Each context's continuation, cut at the first of its `until` strings (greedy unless
      the task asks for a temperature)."""
      out: list[str | None] = [None] * len(requests)
      groups: dict[str, list[int]] = {}
      for i, r in enumerate(requests):
        groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
      eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
      bar = tqdm(total=len(requests), desc='generating', disable=disable_tqdm)
      for idx in groups.values():
        kwargs = normalize_gen_kwargs(requests[idx[0]].args[1], 256)
        until = handle_stop_sequences(kwargs.pop('until', None), eos=eos)
        max_new = kwargs.pop('max_gen_toks')
        room = self.max_length - max_new
        if room < 1:
          raise UserError(f'a task asks for max_gen_toks={max_new} new tokens, which leaves no '
                          f"room for a prompt in the model's context of {self.max_length}")
        prompts = {i: self.tok_encode(requests[i].args[0])[-room:] for i in idx}
        idx = sorted(idx, key=lambda i: -len(prompts[i]))
        for start in range(0, len(idx), self.generate_batch):
          part = idx[start:start + self.generate_batch]
          batch = [prompts[i] for i in part]
          batch += [batch[-1]] * (self.generate_batch - len(batch))   # one shape: one program
          new = sample.generate(
              self.cfg, self.params, batch, max_new_tokens=max_new,
              temperature=float(kwargs.get('temperature', 0.0) or 0.0),
              stop_ids=list(self.ids.stop), seed=int(kwargs.get('seed', 0) or 0))
          for i, ids in zip(part, new):
            out[i] = postprocess_generated_text(self.tok_decode(ids), until, None)
            self.cache_hook.add_partial('generate_until', requests[i].args, out[i])
          bar.update(len(part))
      bar.close()
      return out

  return ZhgptLM


def harness_lm(cfg, params, tokenizer, **kwargs):
  """An lm_eval model (TemplateLM) running our model in-process; kwargs: max_length,
  batch_tokens (rows x positions of one scoring call, default score.tokens_per_call()),
  generate_batch."""
  return _lm_class()(cfg, params, tokenizer, **kwargs)


def task_manager(task_path: str | None = None, data_dir: str | None = None,
                 tasks: str | None = None):
  """lm_eval's TaskManager with our tasks (zhgpt_jax/lm_tasks) and `task_path` (a directory
  of the user's YAML tasks); `data_dir` is the local data our Chinese tasks read.

  When `tasks` (comma-separated) names only tasks of ours or of task_path, by their exact
  names, lm_eval's own ~14,700 task configs are left unindexed (reading their YAML is ~6.5
  CPU seconds on a 2-core machine, more than scoring 600 items); otherwise all are indexed.
  """
  require_lm_eval()
  from lm_eval.tasks import TaskManager
  paths = [TASKS_DIR]
  if task_path:
    if not os.path.isdir(task_path):
      raise UserError(f'--task_path {task_path}: no such directory')
    paths.append(task_path)
  metadata = dict(data_dir=os.path.abspath(data_dir)) if data_dir else None
  if tasks:
    ours = TaskManager(include_path=paths, include_defaults=False, metadata=metadata)
    if all(t.strip() in ours.all_subtasks for t in tasks.split(',') if t.strip()):
      return ours
  return TaskManager(include_path=paths, metadata=metadata)


def resolve_tasks(manager, tasks: str) -> list[str]:
  """The task names of a comma-separated list (lm_eval's globs allowed); UserError naming
  any unknown one."""
  names = [t.strip() for t in tasks.split(',') if t.strip()]
  if not names:
    raise UserError('--tasks: give at least one task name')
  known = set(manager.all_tasks)
  for name in names:
    if name not in known and not manager.match_tasks([name]):
      raise UserError(f'--tasks: unknown task {name!r} (ours: zh_mc, zh_sentiment, '
                      'zh_sentiment_chat; `lm_eval ls tasks` lists lm_eval\'s)')
  return names


def evaluate_tasks(source: str, tasks: str, *, step: int | None = None,
                   limit: float | None = None, num_fewshot: int | None = None,
                   task_path: str | None = None, data_dir: str | None = None,
                   out_dir: str | None = None, max_length: int | None = None) -> dict:
  """`main.py eval --tasks`: runs lm_eval `tasks` on the model of `source` (a workdir or
  hf:DIR), prints lm_eval's table, and writes results JSON + samples under
  `out_dir` (default `<workdir>/lm_eval`). Returns lm_eval's results dict."""
  lm_eval = require_lm_eval()
  from lm_eval.utils import make_table
  # lm_eval's notices (a task's custom kwargs, num_fewshot overridden, ...) are not ours to show.
  logging.getLogger('lm_eval').setLevel(logging.ERROR)
  if data_dir is not None and not os.path.isdir(data_dir):
    raise UserError(f'--task_data {data_dir}: no such directory')
  manager = task_manager(task_path, data_dir, tasks)
  names = resolve_tasks(manager, tasks)
  cfg, params, tokenizer, model_id = pretrained.load_source(source, step)
  lm = harness_lm(cfg, params, tokenizer, max_length=max_length)
  from lm_eval import evaluator
  try:
    # torch_random_seed=None: our model draws no torch randomness, and seeding torch would
    # import it (~9 s of a 600-item run's CPU on this machine) for nothing; for the same
    # reason the results record our environment (env_info), not torch's collect_env.
    # (An lm_eval without that function name is run as it is.)
    with (mock.patch.object(evaluator, 'add_env_info', env_info)
          if hasattr(evaluator, 'add_env_info') else contextlib.nullcontext()):
      results = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot,
                                        limit=limit, task_manager=manager, log_samples=True,
                                        torch_random_seed=None)
  except eval_tasks.TaskDataError as e:
    raise UserError(f'--tasks {tasks}: {e}') from None
  out_dir = out_dir or os.path.join(source.removeprefix('hf:'), 'lm_eval')
  samples = results.pop('samples')
  write_results(out_dir, model_id, results, samples)
  print(make_table(results))
  if 'groups' in results:
    print(make_table(results, 'groups'))
  print(f'eval: results and samples written to {out_dir}')
  results['samples'] = samples
  return results


def env_info(storage: dict) -> None:
  """lm_eval's environment record (the keys of its `add_env_info`) for a JAX model: the
  versions and devices that ran it. lm_eval's own imports torch and transformers and runs
  torch's collect_env (~3 CPU seconds on a 2-core machine) for a model that uses none of them.
  """
  import platform
  from importlib import metadata
  from pathlib import Path
  import jax
  from lm_eval.loggers.utils import get_commit_from_path

  def version(package: str) -> str:
    try:
      return metadata.version(package)
    except metadata.PackageNotFoundError:
      return 'N/A'

  storage.update(
      pretty_env_info=(f'zhgpt_jax {version("zhgpt_jax")} on jax {jax.__version__} (jaxlib '
                       f'{version("jaxlib")}, flax {version("flax")}), devices {jax.devices()}; '
                       f'Python {platform.python_version()} on {platform.platform()}'),
      transformers_version=version('transformers'), lm_eval_version=version('lm_eval'),
      upper_git_hash=get_commit_from_path(Path(os.getcwd(), '..')))


def write_results(out_dir: str, model_id: str, results: dict, samples: dict) -> None:
  """lm_eval's files: results_<time>.json and samples_<task>_<time>.jsonl (as its
  --output_path writes them), each written whole under a temporary name, then renamed."""
  import datetime
  import json
  from lm_eval.utils import handle_non_serializable
  os.makedirs(out_dir, exist_ok=True)
  stamp = datetime.datetime.now().isoformat().replace(':', '-')
  dump = functools.partial(json.dumps, default=handle_non_serializable, ensure_ascii=False)
  texts = {f'results_{stamp}.json': dump(dict(results, model_name=model_id), indent=2)}
  for name, rows in samples.items():
    texts[f'samples_{name}_{stamp}.jsonl'] = ''.join(dump(r) + '\n' for r in rows)
  for name, text in texts.items():
    files.write_text(os.path.join(out_dir, name), text)
