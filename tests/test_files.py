"""files.py: atomic writes leave no temporary behind, and the sweep removes only what a killed
writer of ours left."""

import json
import os
import socket
import subprocess
import sys

from zhgpt_jax import files


def test_atomic_writes_leave_only_the_file(tmp_path):
  path = str(tmp_path / 'a.json')
  files.write_json(path, {'字': 1})
  files.write_text(str(tmp_path / 'b.txt'), 'x')
  files.write_text(str(tmp_path / 'c.bin'), b'\x00\x01')
  assert json.loads(open(path, encoding='utf-8').read()) == {'字': 1}
  assert '字' in open(path, encoding='utf-8').read()   # UTF-8, not \u escapes
  assert sorted(os.listdir(tmp_path)) == ['a.json', 'b.txt', 'c.bin']
  assert files.sha256(str(tmp_path / 'c.bin')) == \
      'b413f47d13ee2fe6c845b2ee141af81de858df4ec549a58b7970bb96645bc8d2'


def test_replace_dir_swaps_whole_directories(tmp_path):
  dst = str(tmp_path / 'out')
  for text in ('old', 'new'):
    tmp = files.temp_path(dst)
    os.makedirs(tmp)
    files.write_text(os.path.join(tmp, 'f'), text)
    files.replace_dir(tmp, dst)
  assert os.listdir(tmp_path) == ['out'] and open(os.path.join(dst, 'f')).read() == 'new'


def test_sweep_removes_only_a_dead_writers_temporaries(tmp_path):
  host = socket.gethostname()
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True)
  dead_pid = int(dead.stdout)
  left = [f'scan.tmp-{host}-{dead_pid}', f'tokenizer.tmp-{host}-{dead_pid}',
          f'train.old-{host}-{dead_pid}']
  kept = [f'scan.tmp-{host}-{os.getpid()}',   # a live writer (this one)
          f'scan.tmp-otherhost-{dead_pid}',   # another host's: its pid means nothing here
          'notes.tmp-backup', 'scan', 'data.tmp-1']   # the user's, or not our scheme
  for name in left + kept:
    os.makedirs(tmp_path / name)
  (tmp_path / f'progress.json.tmp-{host}-{dead_pid}').write_text('{')
  removed = files.sweep(str(tmp_path))
  assert sorted(removed) == sorted(left + [f'progress.json.tmp-{host}-{dead_pid}'])
  assert sorted(os.listdir(tmp_path)) == sorted(kept)
  # Under the directory's lock every temporary of this host is stale but the caller's own.
  assert files.sweep(str(tmp_path), all_ours=True) == []
  os.makedirs(tmp_path / f'x.tmp-{host}-1')
  assert files.sweep(str(tmp_path), all_ours=True) == [f'x.tmp-{host}-1']
  # In a folder of the user's (an export target's parent) only the target's own temporaries go.
  os.makedirs(tmp_path / f'export.tmp-{host}-{dead_pid}')
  os.makedirs(tmp_path / f'mine.tmp-{host}-{dead_pid}')
  assert files.sweep(str(tmp_path), of=str(tmp_path / 'export')) == [f'export.tmp-{host}-{dead_pid}']
  assert os.path.isdir(tmp_path / f'mine.tmp-{host}-{dead_pid}')
