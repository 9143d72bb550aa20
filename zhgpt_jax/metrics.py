"""Where training numbers go: TensorBoard events, metrics.jsonl, and a loss-curve PNG.

Only process 0 writes (`enabled=False` elsewhere), so a multi-host run logs once. A run that
resumes from step N first drops the records past N (steps it is about to redo) from
metrics.jsonl, and its TensorBoard writer purges the events past N, so curves never double back.
"""

from __future__ import annotations

import json
import os
import sys

from zhgpt_jax import files


class MetricsWriter:
  """Appends {'step', 'split', ...scalars} records; `close` also draws loss_curve.png."""

  def __init__(self, workdir: str, enabled: bool = True, start_step: int = 0):
    self.workdir = workdir
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if enabled:
      SummaryWriter = _summary_writer_class()
      os.makedirs(workdir, exist_ok=True)
      drop_after(self.path, start_step)
      self._tb = SummaryWriter(os.path.join(workdir, 'tb'), purge_step=start_step + 1)

  def scalars(self, step: int, split: str, values: dict) -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in values.items()}
    for k, v in values.items():
      self._tb.add_scalar(f'{split}/{k}', v, step)
    with open(self.path, 'a', encoding='utf-8') as f:
      f.write(json.dumps({'step': step, 'split': split, **values}, ensure_ascii=False) + '\n')

  def text(self, step: int, tag: str, text: str) -> None:
    if not self.enabled:
      return
    self._tb.add_text(tag, text, step)
    with open(self.path, 'a', encoding='utf-8') as f:
      f.write(json.dumps({'step': step, 'split': 'text', tag: text}, ensure_ascii=False) + '\n')

  def close(self, plot: bool = True) -> None:
    if not self.enabled:
      return
    self._tb.close()
    if plot:
      plot_loss_curve(self.path, os.path.join(self.workdir, 'loss_curve.png'))


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without torch when torch is installed but not yet
  loaded: tensorboardX imports torch only to accept torch tensors (we log floats), and
  that import costs seconds of every start."""
  if 'torch' in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    return SummaryWriter
  sys.modules['torch'] = None   # `import torch` raises ImportError, which tensorboardX expects
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  finally:
    del sys.modules['torch']
  return SummaryWriter


def drop_after(path: str, step: int) -> None:
  """Rewrites metrics.jsonl without its records past `step` (and any torn last line)."""
  if not os.path.exists(path):
    return
  with open(path, encoding='utf-8', errors='replace') as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      if json.loads(line)['step'] <= step:
        kept.append(line if line.endswith('\n') else line + '\n')
    except (ValueError, KeyError, TypeError):
      continue   # a line torn by a kill: it was never a whole record
  if len(kept) != len(lines):
    files.write_text(path, ''.join(kept))


def read_metrics(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    records = []
    for line in f:
      try:
        records.append(json.loads(line))
      except ValueError:
        continue   # a line torn by a kill
    return records


def plot_loss_curve(metrics_path: str, png_path: str) -> None:
  """Train and val loss against step, from metrics.jsonl (a resumed run's too)."""
  # A bare Figure draws without touching pyplot's backend, so notebooks keep inline plots.
  from matplotlib.figure import Figure
  records = read_metrics(metrics_path)
  fig = Figure(figsize=(7, 4))
  ax = fig.subplots()
  for split, style in (('train', '-'), ('val', 'o-')):
    points = sorted({r['step']: r['loss'] for r in records
                     if r.get('split') == split and 'loss' in r}.items())
    if points:
      ax.plot(*zip(*points), style, label=split)
  ax.set_xlabel('step')
  ax.set_ylabel('loss (nats/token)')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  tmp = png_path + '.tmp.png'
  fig.savefig(tmp, dpi=100)
  os.replace(tmp, png_path)
