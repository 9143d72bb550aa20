"""The data of our lm_eval tasks (zhgpt_jax/lm_tasks/*.yaml): Chinese multiple choice read
from local files, and the builtin review-sentiment set.

`zh_mc` reads the common Chinese exam format -- a question, options A-D and an answer
letter -- from a directory the user names (`main.py eval --task_data DIR`, or lm_eval's
`--metadata '{"data_dir": "DIR"}'`); nothing is downloaded. It takes the layouts of the
published sets as they unpack:

  C-Eval  DIR/{dev,val,test}/<subject>_{dev,val,test}.csv  (id,question,A,B,C,D,answer[,explanation]);
          DIR/subject_mapping.json names each subject in Chinese
  CMMLU   DIR/{dev,test}/<subject>.csv                     (,Question,A,B,C,D,Answer)
  any     DIR/*.csv | *.jsonl                              ({"question", "A".."D" or "choices", "answer"})

Column names are matched without case; `answer` is a letter A-D (or, in jsonl, the index
0-3). The evaluated split is val where it has answered items (C-Eval's test answers are
not public), else test, else the files at the top; few-shot examples come from dev (from
the evaluated items where there is no dev: an item may then be its own example), the first
k in file order, as lm_eval's own ceval/cmmlu tasks take them (point DIR at one subject's
files for examples of that subject). A row lacking a field is skipped and counted, one line
per file.

Documents are plain dicts; lm_eval wraps them in `datasets.Dataset`.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import sys
from typing import Iterable

LETTERS = ('A', 'B', 'C', 'D')
SPLITS = ('dev', 'val', 'validation', 'test')


class TaskDataError(ValueError):
  """A task's local data is missing or unusable (main.py prints it as one line)."""


def _field(row: dict, name: str):
  for key, value in row.items():
    if key is not None and key.strip().lower() == name.lower():
      return value
  return None


def mc_doc(row: dict, subject: str) -> dict | None:
  """A {question, A, B, C, D, answer, subject} document of a csv/jsonl row, or None when a
  field is missing, an option empty, or the answer not one of A-D."""
  question = _field(row, 'question')
  options = [_field(row, k) for k in LETTERS]
  choices = _field(row, 'choices')
  if all(o is None for o in options) and isinstance(choices, list) and len(choices) == 4:
    options = choices
  answer = _field(row, 'answer')
  if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < 4:
    answer = LETTERS[answer]
  answer = answer.strip().upper() if isinstance(answer, str) else None
  if (not isinstance(question, str) or not question.strip() or answer not in LETTERS
      or any(not isinstance(o, (str, int, float)) or str(o).strip() == '' for o in options)):
    return None
  return dict(question=question.strip(), **{k: str(o).strip() for k, o in zip(LETTERS, options)},
              answer=answer, subject=subject)


def mc_text(doc: dict) -> str:
  """zh_mc's prompt of a document, lm_eval's ceval/cmmlu one: the question, a line `A. …`
  per option, then `答案：`. In Python, not a jinja template in the YAML, because lm_eval
  compiles a template anew for every document (with the answer's, ~1.3 of the ~10 CPU
  seconds `main.py eval` takes for 600 items on a 2-core machine)."""
  return ''.join([doc['question'], *(f'\n{k}. {doc[k]}' for k in LETTERS), '\n答案：'])


def mc_target(doc: dict) -> int:
  """zh_mc's answer as the index of its choice (A-D)."""
  return LETTERS.index(doc['answer'])


def _rows(path: str) -> Iterable[dict]:
  if path.endswith('.csv'):
    with open(path, encoding='utf-8-sig', newline='') as f:
      yield from csv.DictReader(f)
    return
  with open(path, encoding='utf-8-sig') as f:
    for line in f:
      if line.strip():
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          row = None
        yield row if isinstance(row, dict) else {}


def _subject(path: str, names: dict) -> str:
  """The subject's Chinese name (C-Eval's subject_mapping.json), or '' when unknown."""
  stem = os.path.splitext(os.path.basename(path))[0]
  for split in SPLITS:
    stem = stem.removesuffix(f'_{split}')
  name = names.get(stem)
  if isinstance(name, list) and len(name) > 1:
    return str(name[1])
  return name if isinstance(name, str) else ''


def read_mc_files(paths: list[str], names: dict, report=None) -> list[dict]:
  """The documents of `paths`, in order; skipped rows are counted per file in `report`."""
  docs = []
  for path in paths:
    subject, skipped = _subject(path, names), 0
    for row in _rows(path):
      doc = mc_doc(row, subject)
      if doc is None:
        skipped += 1
      else:
        docs.append(doc)
    if skipped and report is not None:
      report(f'zh_mc: skipped {skipped} rows without a question, four options and an '
             f'answer A-D in {path}')
  return docs


def _files(directory: str) -> list[str]:
  return sorted(p for ext in ('csv', 'jsonl')
                for p in glob.glob(os.path.join(directory, f'*.{ext}')))


def load_mc(data_dir: str | None = None, report=None, **_) -> dict:
  """`zh_mc`'s custom_dataset: {'eval': docs, 'dev': few-shot docs} as datasets.Dataset."""
  import datasets   # lm_eval's dependency
  if not data_dir:
    raise TaskDataError('zh_mc reads a local directory: main.py eval --task_data DIR, or '
                        'lm_eval ... --metadata \'{"data_dir": "DIR"}\'')
  if not os.path.isdir(data_dir):
    raise TaskDataError(f'zh_mc: data_dir {data_dir}: no such directory')
  report = report or (lambda line: print(line, file=sys.stderr))
  names = {}
  mapping = os.path.join(data_dir, 'subject_mapping.json')
  if os.path.isfile(mapping):
    with open(mapping, encoding='utf-8') as f:
      names = json.load(f)
  splits = {s: read_mc_files(_files(os.path.join(data_dir, s)), names, report)
            for s in SPLITS if os.path.isdir(os.path.join(data_dir, s))}
  top = read_mc_files(_files(data_dir), names, report)
  evaluated = next((splits[s] for s in ('val', 'validation', 'test') if splits.get(s)), top)
  if not evaluated:
    raise TaskDataError(f'zh_mc: no answered question in {data_dir} (csv or jsonl files with '
                        'question, A, B, C, D and answer, at the top or in val/ or test/)')
  dev = splits.get('dev') or evaluated
  return {'eval': datasets.Dataset.from_list(evaluated), 'dev': datasets.Dataset.from_list(dev)}


def load_sentiment(**_) -> dict:
  """`zh_sentiment`'s custom_dataset: the builtin held-out reviews (sft.heldout_examples
  order, both labels alternating) for 'eval', 100 training reviews for few-shot 'dev'."""
  import datasets
  import jinja2
  from zhgpt_jax import builtin_corpus, sft
  from zhgpt_jax.tokenizer import CHAT_TEMPLATE
  train, heldout = builtin_corpus.split_reviews()
  template = jinja2.Template(CHAT_TEMPLATE)

  def docs(reviews):
    return [dict(review=text, label=label,
                 chat=template.render(messages=sft.review_conversation(text),
                                      add_generation_prompt=True))
            for text, label in reviews]

  return {'eval': datasets.Dataset.from_list(docs(sft.heldout_examples(heldout, 0))),
          'dev': datasets.Dataset.from_list(docs(sft.heldout_examples(train, 100)))}
