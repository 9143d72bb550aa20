"""A served model for the tests and bench/serve.py: a workdir saved through the real checkpoint
code, and `main.py serve` started on it on a free localhost port.

The model is the session's tiny config (vocab 1000) with random weights N(0, 0.2): at that
scale greedy continuations depend on the whole prompt and rarely repeat, so a reply mixed up
with another request's would show.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

import jax
import numpy as np

from helpers import free_port
from zhgpt_jax import checkpoint
from zhgpt_jax import model as model_lib
from zhgpt_jax import tokenizer as tok_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_KEY = 'test-key-123'


def random_workdir(config, tokenizer_dir: str, workdir: str, seq_len: int = 128,
                   scale: float = 0.2) -> str:
  """A workdir (config.json, tokenizer/, checkpoint at step 0) with N(0, scale) weights."""
  config = copy.deepcopy(config)
  config.model.seq_len = seq_len
  checkpoint.save_run_files(workdir, config, tokenizer_dir)
  tokenizer = tok_lib.load_tokenizer(tokenizer_dir)
  cfg = model_lib.model_config(config.model, tokenizer.get_vocab_size())
  shapes = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.PRNGKey(0)))
  rng = np.random.RandomState(0)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: np.ones(x.shape, np.float32) if 'scale' in jax.tree_util.keystr(path)
      else rng.normal(0, scale, x.shape).astype(np.float32), shapes)
  ckpt = checkpoint.Checkpointer(workdir, keep=1, async_save=False)
  try:
    ckpt.save(0, dict(params=params, step=np.int32(0)), None,
              dict(step=0, tokenizer_hash=tok_lib.tokenizer_hash(tokenizer_dir)))
  finally:
    ckpt.close()
  return workdir


def get(url: str, key: str | None = None, timeout: float = 5) -> tuple[int, bytes]:
  req = urllib.request.Request(url, headers={'Authorization': f'Bearer {key}'} if key else {})
  try:
    with urllib.request.urlopen(req, timeout=timeout) as r:
      return r.status, r.read()
  except urllib.error.HTTPError as e:
    return e.code, e.read()


class ChildServer:
  """An HTTP server as a child process, its output in a temporary file: started, then waited
  for until `GET /health` answers 200 (or it exits, or `timeout` passes); `close` stops it."""

  def __init__(self, what: str, argv: list[str], env: dict, *, port: int, timeout: float,
               poll: float = 0.2, stop_timeout: float = 20):
    self.what, self.port, self.stop_timeout = what, port, stop_timeout
    self.url = f'http://127.0.0.1:{port}'
    self.log = tempfile.TemporaryFile('w+', encoding='utf-8')
    self.proc = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while True:
      if self.proc.poll() is not None:
        raise RuntimeError(f'{what} exited: {self.output()[-3000:]}')
      try:
        if get(f'{self.url}/health')[0] == 200:
          break
      except OSError:
        pass
      if time.time() > deadline:
        out = self.output()[-3000:]
        self.close()
        raise RuntimeError(f'{what} did not start in {timeout:.0f} s: {out}')
      time.sleep(poll)

  def output(self) -> str:
    self.log.flush()
    self.log.seek(0)
    return self.log.read()

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(timeout=self.stop_timeout)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    self.log.close()


class Served(ChildServer):
  """`python main.py serve --workdir W --port P` as a child process; `close` stops it."""

  def __init__(self, workdir: str, *args: str, env: dict | None = None, timeout: float = 600):
    port = free_port()
    super().__init__(
        'the server',
        [sys.executable, os.path.join(ROOT, 'main.py'), 'serve', '--workdir', workdir,
         '--port', str(port), *args],
        dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', **(env or {})),
        port=port, timeout=timeout)


def chromium(user_data_dir: str, size=(880, 560)):
  """A headless Debian chromium driven by selenium through chromium-driver (apt packages).

  Raises FileNotFoundError when either is missing: the caller decides whether to skip.
  """
  import shutil
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  binary = shutil.which('chromium') or shutil.which('chromium-browser')
  driver = shutil.which('chromedriver')
  if not binary or not driver:
    raise FileNotFoundError('chromium and chromium-driver are not installed '
                            '(apt-get install -y chromium chromium-driver)')
  options = webdriver.ChromeOptions()
  options.binary_location = binary
  for arg in ('--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
              '--disable-background-networking', '--disable-component-update', '--disable-sync',
              '--disable-dev-shm-usage', f'--user-data-dir={user_data_dir}',
              f'--window-size={size[0]},{size[1]}', '--lang=zh-CN'):
    options.add_argument(arg)
  return webdriver.Chrome(options=options, service=Service(driver))


def chat_in_page(driver, url: str, messages: list[str], *, api_key: str | None = None,
                 temperature: float = 0.0, max_tokens: int = 40, timeout: float = 60) -> dict:
  """Opens the chat page, sets its controls, sends `messages` one turn at a time.

  Returns {'bubbles': [(role, text)], 'partials': [each reply's distinct non-empty texts as it
  streamed in (pieces that arrive together show as one)], 'pieces': [how many streamed
  pieces each reply was built from],
  'history': the page's conversation as its next request would send it}.
  """
  from selenium.webdriver.common.by import By
  from selenium.webdriver.common.keys import Keys
  from selenium.webdriver.support.ui import WebDriverWait
  driver.get(url)
  wait = WebDriverWait(driver, timeout)
  wait.until(lambda d: d.find_element(By.ID, 'model').text not in ('', '…'))
  for field, value in (('api-key', api_key or ''), ('temperature', temperature),
                       ('max-tokens', max_tokens)):
    el = driver.find_element(By.ID, field)
    el.clear()
    el.send_keys(str(value))
    driver.execute_script('arguments[0].dispatchEvent(new Event("change"))', el)
  partials = []
  for text in messages:
    # Record the newest reply's text each time the page changes it while it streams in.
    driver.execute_script('''
      window.__texts = [];
      new MutationObserver(() => {
        const replies = document.querySelectorAll(".msg.assistant");
        const text = replies.length ? replies[replies.length - 1].textContent : "";
        if (text && !window.__texts.includes(text)) window.__texts.push(text);
      }).observe(document.getElementById("log"),
                 {subtree: true, childList: true, characterData: true});''')
    box = driver.find_element(By.ID, 'input')
    box.send_keys(text)
    box.send_keys(Keys.ENTER)
    n = len(partials) + 1
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '.msg.assistant')) >= n
               and d.find_element(By.TAG_NAME, 'body').get_attribute('data-state') == 'idle')
    partials.append(driver.execute_script('return window.__texts'))
  bubbles = driver.execute_script(
      'return [...document.querySelectorAll(".msg")].map(e => [e.dataset.role, e.textContent])')
  pieces = driver.execute_script(
      'return [...document.querySelectorAll(".msg.assistant")].map(e => Number(e.dataset.pieces))')
  history = driver.execute_script('return conversation')
  return dict(bubbles=[tuple(b) for b in bubbles], partials=partials, pieces=pieces,
              history=history)


def refused_turn(driver, text: str, max_tokens: int, timeout: float = 60) -> dict:
  """Sends `text` with a max-tokens setting the server refuses; returns the page's bubbles,
  the input box's text and the conversation afterwards."""
  from selenium.webdriver.common.by import By
  from selenium.webdriver.common.keys import Keys
  from selenium.webdriver.support.ui import WebDriverWait
  field = driver.find_element(By.ID, 'max-tokens')
  field.clear()
  field.send_keys(str(max_tokens))
  box = driver.find_element(By.ID, 'input')
  box.send_keys(text)
  box.send_keys(Keys.ENTER)
  WebDriverWait(driver, timeout).until(
      lambda d: d.find_elements(By.CSS_SELECTOR, '.msg.error')
      and d.find_element(By.TAG_NAME, 'body').get_attribute('data-state') == 'idle')
  return dict(
      bubbles=[tuple(b) for b in driver.execute_script(
          'return [...document.querySelectorAll(".msg")].map(e => [e.dataset.role, e.textContent])')],
      input=box.get_property('value'), history=driver.execute_script('return conversation'))
