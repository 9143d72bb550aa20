"""Writing files so that a kill never leaves a half-written one in use: write-then-rename.

One naming scheme for temporaries: `<path>.tmp-<host>-<pid>` (and `<path>.old-<host>-<pid>`
for what a directory replaced), so `sweep` can tell what a killed writer of ours left (this
host, a process that no longer runs) from what a live writer on this or another host is
writing, and removes only the former. No JAX, no other zhgpt_jax module.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket

_TEMP = re.compile(r'^(?P<path>.+)\.(?:tmp|old)-(?P<host>.+)-(?P<pid>\d+)$')


def temp_path(path: str, kind: str = 'tmp') -> str:
  """`path`'s temporary of this process: `<path>.<kind>-<host>-<pid>` (kind 'tmp' or 'old')."""
  return f'{path}.{kind}-{socket.gethostname()}-{os.getpid()}'


def write_text(path: str, text: str | bytes) -> None:
  """Writes `text` (str as UTF-8, or bytes) to `path` through a temporary renamed over it."""
  tmp = temp_path(path)
  with open(tmp, 'wb') as f:
    f.write(text.encode('utf-8') if isinstance(text, str) else text)
  os.replace(tmp, path)


def write_json(path: str, obj, indent: int | None = 2) -> None:
  """`obj` as JSON (UTF-8, non-ASCII kept) written atomically (`write_text`)."""
  write_text(path, json.dumps(obj, ensure_ascii=False, indent=indent))


def replace_dir(tmp: str, dst: str) -> None:
  """Moves the finished directory `tmp` to `dst`; an existing `dst` is first renamed to its
  'old' temporary, then deleted, so `dst` is at every moment the old or the new whole."""
  old = None
  if os.path.isdir(dst):
    old = temp_path(dst, 'old')
    shutil.rmtree(old, ignore_errors=True)
    os.rename(dst, old)
  os.rename(tmp, dst)
  if old:
    shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:   # alive, another user's
    return True
  return True


def sweep(directory: str, all_ours: bool = False, of: str | None = None) -> list[str]:
  """Removes the temporaries in `directory` that a killed writer left: named by `temp_path`,
  of this host, by a process that no longer runs (`all_ours`: any of this host, for a caller
  that holds the directory's lock). `of`: only the temporaries of that one path (for a folder of
  the user's, e.g. an export target's parent, where other names are none of our business).
  Returns the names removed; nothing else is touched."""
  host, removed = socket.gethostname(), []
  for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else ():
    m = _TEMP.match(name)
    if m and of is not None and m['path'] != os.path.basename(of):
      continue
    if m and m['host'] == host and (all_ours or not _alive(int(m['pid']))) \
        and int(m['pid']) != os.getpid():
      path = os.path.join(directory, name)
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
      else:
        os.remove(path)
      removed.append(name)
  return removed


def sha256(path: str, chunk: int = 1 << 20) -> str:
  """The hex sha256 of a file's bytes, read a chunk at a time."""
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(chunk), b''):
      h.update(block)
  return h.hexdigest()
