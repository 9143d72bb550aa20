"""zhgpt-jax command line: `python main.py` in a checkout, `zhgpt` once installed (the same code).

  python main.py [COMMAND] --config configs/X.py [--workdir DIR] [--config.a.b=v]

Commands: train (default), prepare, eval, sample, chat, export, serve. eval/sample/chat/export/
serve read the config saved in --workdir when no --config is given (serve also takes
--workdir hf:DIR, a HuggingFace directory). A --config path that does not exist from the
current directory is looked up among the package's configs (`config.configs_dir()`), so
`--config configs/tiny.py` works from any directory.

Where user errors end and internal ones begin: a mistake in the user's input -- flags, config
values, files, paths, damaged or missing checkpoints, a full disk during a save -- is raised
as `zhgpt_jax.config.UserError` by the stage that finds it and printed here as one line,
`main.py: error: ...` (`zhgpt: error: ...` for the command), with exit code 2. Flag parsing
errors are turned into that line here.
Any other exception is a bug in zhgpt-jax or a library and keeps its traceback (exit 1).
"""

import logging as std_logging
import os
import re
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from zhgpt_jax import __version__
from zhgpt_jax.config import configs_dir

COMMANDS = ('train', 'prepare', 'eval', 'sample', 'chat', 'export', 'serve')

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/tiny.py.')
flags.DEFINE_string('workdir', None, 'Run directory (default: runs/<config name>).')
flags.DEFINE_integer('step', None, 'eval/sample/export: checkpoint step (default: latest).')
flags.DEFINE_string('prompt', None, 'sample: the prompt text.')
flags.DEFINE_string('prompt_file', None, 'sample: a file with one prompt per line.')
flags.DEFINE_string('out', None, 'export: the HuggingFace directory (or the .gguf file) to write; '
                    'eval --tasks: where the results go (default <workdir>/lm_eval).')
flags.DEFINE_enum('format', 'hf', ['hf', 'gguf'], 'export: a HuggingFace directory or a GGUF '
                  'file (llama.cpp, Ollama).')
flags.DEFINE_enum('gguf_type', 'f32', ['f32', 'f16', 'bf16', 'q8_0'],
                  'export --format gguf: the type of the weight matrices.')
flags.DEFINE_bool('overwrite', False, 'export: replace an existing --out.')
flags.DEFINE_string('host', '127.0.0.1', 'serve: the address to listen on.')
flags.DEFINE_integer('port', 8000, 'serve: the port to listen on.')
flags.DEFINE_string('api_key', None, 'serve: require "Authorization: Bearer KEY" on /v1 '
                    '(default: $ZHGPT_API_KEY; none = open).')
flags.DEFINE_string('tasks', None, 'eval: lm_eval tasks, comma-separated (e.g. zh_mc,zh_sentiment); '
                    'without it eval reports val loss.')
flags.DEFINE_float('limit', None, 'eval --tasks: items per task (< 1: a fraction of them).')
flags.DEFINE_integer('num_fewshot', None, 'eval --tasks: few-shot examples per item.')
flags.DEFINE_string('task_path', None, 'eval --tasks: a directory of your own lm_eval YAML tasks.')
flags.DEFINE_string('task_data', None, 'eval --tasks: the local data directory zh_mc reads '
                    '(C-Eval / CMMLU csv, or jsonl).')
FLAGS = flags.FLAGS


def _prog() -> str:
  return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else 'zhgpt'


def _fail(msg: str):
  print(f'{_prog()}: error: {msg}', file=sys.stderr)
  sys.exit(2)


def _one_line(e: BaseException, argv) -> str:
  text = ' '.join(str(e).replace('\\n', ' ').replace("\\'", "'").split()).strip('\'"')
  if isinstance(e, (AttributeError, KeyError)):  # an override names a key the config lacks
    key = text.split("'")[0]
    bad = [a.split('=')[0] for a in argv if a.startswith('--config.') and f'.{key}' in a]
    text = f'unknown config key {bad[0] if bad else key}' + (
        f' ({text[len(key):].strip(chr(39) + " ")})' if 'Did you mean' in text else '')
  return text or type(e).__name__


def _raised_in(e: BaseException, config_path: str | None) -> str | None:
  """'--config FILE: line N: Type: message' when `e` (or an exception it wraps: config_flags
  re-raises with the traceback's text) was raised by the code of the config file."""
  if not config_path:
    return None
  path = os.path.realpath(config_path.split(':')[0])
  seen = []
  while e is not None and e not in seen:
    seen.append(e)
    e = e.__cause__ or e.__context__
  for err in reversed(seen):   # the innermost first: the exception the file itself raised
    lines = [f.lineno for f in traceback.extract_tb(err.__traceback__)
             if os.path.realpath(f.filename) == path]
    if isinstance(err, SyntaxError) and os.path.realpath(err.filename or '') == path:
      lines, err = [err.lineno], SyntaxError(err.msg)
    if lines:
      text = ' '.join(str(err).split())
      locked = re.search(r'Key "(\w+)" does not exist and cannot be added since the config is '
                         r'locked', text)
      if locked:   # a typo in the config file: default_config() is locked
        hint = re.search(r'Did you mean "\w+" instead of "\w+"\?', text)
        return (f'--config {config_path}: line {lines[-1]}: unknown config key '
                f'{locked[1]!r}' + (f' ({hint[0]})' if hint else ''))
      if type(err).__name__ == 'UserError':   # worded for the user already (zhgpt_jax's own)
        return f'--config {config_path}: {text}'
      return (f'--config {config_path}: line {lines[-1]}: {type(err).__name__}'
              + (f': {text}' if text else ''))
  return None


def _value(argv, name):
  for i, a in enumerate(argv):
    if a == f'--{name}' and i + 1 < len(argv):
      return argv[i + 1]
    if a.startswith(f'--{name}='):
      return a.split('=', 1)[1]
  return None


def parse_flags(argv):
  """absl parsing with one-line errors; fills --config from --workdir when it is omitted."""
  argv = list(argv)
  config_path = _value(argv, 'config')
  if config_path and not os.path.isfile(config_path.split(':')[0]):
    packaged = _packaged_config(config_path)
    if packaged is None:
      _fail(f'--config {config_path}: no such config file')
    argv = [f'--config={packaged}' if a == f'--config={config_path}' else a for a in argv]
    if '--config' in argv:
      argv[argv.index('--config') + 1] = packaged
    config_path = packaged
  if config_path is None:
    workdir = _value(argv, 'workdir')
    if workdir and (workdir.startswith('hf:') or
                    os.path.exists(os.path.join(workdir, 'config.json'))):
      argv.insert(1, f'--config={os.path.join(configs_dir(), "from_workdir.py")}:{workdir}')
  try:
    rest = FLAGS(argv)
  except Exception as e:  # config_flags raises many kinds; all are the user's input
    _fail(_raised_in(e, config_path) or _one_line(e, argv))
  import ml_collections
  error = object.__getattribute__(_CONFIG.value, '_error') if type(
      _CONFIG.value).__name__ == '_ErrorConfig' else None   # an OSError config_flags kept
  if error is not None:
    _fail(_raised_in(error, config_path) or f'--config {config_path}: {error}')
  if _CONFIG.value is not None and not isinstance(_CONFIG.value, ml_collections.ConfigDict):
    _fail(f'--config {config_path}: get_config() returned a {type(_CONFIG.value).__name__}, '
          'not an ml_collections.ConfigDict')
  return rest


def _packaged_config(config_path: str) -> str | None:
  """`configs/tiny.py[:arg]` (or `tiny.py`) among the package's configs, when it is there."""
  path, sep, arg = config_path.partition(':')
  if os.path.isabs(path):
    return None
  rel = os.path.normpath(path)
  rel = rel[len('configs' + os.sep):] if rel.startswith('configs' + os.sep) else rel
  try:
    found = os.path.join(configs_dir(), rel)
  except Exception:  # pylint: disable=broad-except  (no configs anywhere: the plain error)
    return None
  return found + sep + arg if os.path.isfile(found) else None


class _QuietOrbax(std_logging.Filter):
  """Drops orbax's own log records: its failures come back to us as exceptions."""

  def filter(self, record):
    return '/orbax/' not in record.pathname.replace(os.sep, '/')


def _without_closed_loop_errors(default, exc_of):
  """`default` (sys.excepthook or sys.unraisablehook), silent on 'Event loop is closed': what
  tensorstore's callbacks, still running after orbax gave up on a damaged file, print. The
  failure itself reaches us as an exception already."""
  def hook(*args):
    exc = exc_of(*args)
    if not (isinstance(exc, RuntimeError) and 'Event loop is closed' in str(exc)):
      default(*args)
  hook.quiet = True
  return hook


def quiet_orbax() -> None:
  """Interpreter-wide, once at start-up (`main`): orbax's own log records dropped, and the
  'Event loop is closed' noise of tensorstore's late callbacks silenced (our checkpoint code
  gets every failure as an exception). Calling it again changes nothing."""
  if not getattr(sys.excepthook, 'quiet', False):
    sys.excepthook = _without_closed_loop_errors(sys.excepthook, lambda kind, value, tb: value)
  if not getattr(sys.unraisablehook, 'quiet', False):
    sys.unraisablehook = _without_closed_loop_errors(sys.unraisablehook, lambda u: u.exc_value)
  for name in ('absl', ''):
    logger = std_logging.getLogger(name)
    if not any(isinstance(f, _QuietOrbax) for f in logger.filters):
      logger.addFilter(_QuietOrbax())
  for handler in std_logging.getLogger().handlers + std_logging.getLogger('absl').handlers:
    if not any(isinstance(f, _QuietOrbax) for f in handler.filters):
      handler.addFilter(_QuietOrbax())


def main(argv):
  command = argv[1] if len(argv) > 1 else 'train'
  if command not in COMMANDS or len(argv) > 2:
    _fail(f'unknown command {" ".join(argv[1:])!r}; expected one of {", ".join(COMMANDS)}')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)   # orbax logs every save at INFO
  quiet_orbax()
  config = _CONFIG.value
  if config is None and FLAGS.workdir:
    _fail(f'--config is required: --workdir {FLAGS.workdir} is not a saved run (no config.json)')
  if config is None:
    _fail('--config is required (e.g. --config configs/tiny.py), or --workdir of a saved run')
  workdir = FLAGS.workdir or os.path.join('runs', _config_name(FLAGS['config'].serialize()))

  from zhgpt_jax.config import UserError, disk_cause
  explicit = set(config_flags.get_override_values(FLAGS['config']))
  try:
    dispatch(command, config, workdir, explicit)
  except UserError as e:
    _fail(str(e))
  except OSError as e:   # one the stage did not word itself: still the user's to fix
    if disk_cause(e) is None:
      raise
    _fail(f'{command} failed ({disk_cause(e)}' + (f': {e.filename}' if e.filename else '')
          + '); free the space or fix the permission and run the same command again')
  except KeyboardInterrupt:
    print('interrupted', file=sys.stderr)
    sys.exit(130)
  except Exception as e:  # pylint: disable=broad-except
    from zhgpt_jax import parallel
    line = parallel.peer_failure(e)
    if line is None:
      raise
    print(f'{_prog()}: error: {line}', file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)  # not sys.exit: jax's exit hook would wait on the lost process, then abort


def _config_name(serialized: str) -> str:
  path = serialized.split('=', 1)[-1]
  name, _, arg = path.partition(':')
  base = os.path.splitext(os.path.basename(name))[0]
  return f'{base}-{arg}' if arg and base != 'from_workdir' else base


def dispatch(command, config, workdir, explicit=()):
  """Runs `command`; `explicit` holds the config keys set on the command line."""
  from zhgpt_jax.config import UserError, check_paths, validate
  try:
    check_paths(config, workdir, training=command == 'train')
    if command in ('train', 'prepare'):
      from zhgpt_jax import pretrained   # init_from's model shape and tokenizer
      config = pretrained.resolve(config, explicit)
    if command != 'train':   # train.build validates the config it runs (once, before any work)
      validate(config)
  except (KeyError, AttributeError, TypeError) as e:  # a config file without the usual fields
    raise UserError(f'the config lacks a field or has one of the wrong type ({e}); start it '
                    'from zhgpt_jax.config.default_config()') from None
  if command == 'export' and not FLAGS.out:
    _fail('export needs --out DIR (or --out FILE.gguf --format gguf)')
  if command == 'export' and FLAGS.format == 'hf' and FLAGS.out.endswith('.gguf'):
    _fail(f'--out {FLAGS.out}: pass --format gguf to write a GGUF file')
  if command == 'sample':
    prompts = _prompts()
  if command == 'prepare' and config.data.get('peek', 0):
    from zhgpt_jax import peek
    peek.peek(config)
  elif command == 'prepare':
    from zhgpt_jax import dataprep
    dataprep.prepare(config, workdir)
  elif command == 'train':
    from zhgpt_jax import train
    train.train_and_evaluate(config, workdir, _task_builder(config.task))
  elif command == 'eval' and FLAGS.tasks is not None:
    from zhgpt_jax import harness
    limit = FLAGS.limit
    harness.evaluate_tasks(workdir, FLAGS.tasks, step=FLAGS.step,
                           limit=int(limit) if limit is not None and limit >= 1 else limit,
                           num_fewshot=FLAGS.num_fewshot, task_path=FLAGS.task_path,
                           data_dir=FLAGS.task_data, out_dir=FLAGS.out)
  elif command == 'eval':
    from zhgpt_jax import checkpoint, train
    saved = checkpoint.load_config(workdir)
    result = train.evaluate_workdir(workdir, FLAGS.step, _task_builder(saved.task))
    print(f'step {result.pop("step")}: ' + ', '.join(f'{k} {v:.4f}' for k, v in result.items()))
  elif command == 'sample':
    from zhgpt_jax import sample
    sample.sample_workdir(workdir, prompts, config.sample, FLAGS.step)
  elif command == 'chat':
    from zhgpt_jax import chat
    chat.chat(workdir, config.sample, FLAGS.step)
  elif command == 'export':
    from zhgpt_jax import export, gguf_export
    from zhgpt_jax.config import disk_errors
    with disk_errors('export', f'the partial export was removed and {FLAGS.out} is as it was; '
                     'free the space or fix the permission and run the same command',
                     FLAGS.out):
      if FLAGS.format == 'gguf':
        print(gguf_export.export_workdir(workdir, FLAGS.out, FLAGS.gguf_type, FLAGS.overwrite,
                                         FLAGS.step))
      else:
        print(export.export_workdir(workdir, FLAGS.out, FLAGS.overwrite, FLAGS.step))
  elif command == 'serve':
    from zhgpt_jax import serve
    serve.serve(workdir, config, host=FLAGS.host, port=FLAGS.port, api_key=FLAGS.api_key,
                step=FLAGS.step, explicit=explicit)


def _task_builder(task: str):
  """The data.Task builder of config.task; None is pretraining's, train's default."""
  if task == 'sft':
    from zhgpt_jax import sft
    return sft.make_task
  return None


def _prompts():
  from zhgpt_jax.config import UserError
  if FLAGS.prompt_file:
    path = FLAGS.prompt_file
    if not os.path.isfile(path):
      raise UserError(f'--prompt_file {path}: ' + ('is a directory' if os.path.isdir(path)
                                                   else 'no such file'))
    prompts = []
    with open(path, 'rb') as f:
      for n, raw in enumerate(f, 1):
        try:
          line = raw.decode('utf-8').rstrip('\r\n')
        except UnicodeDecodeError:
          raise UserError(f'--prompt_file {path}: line {n} is not UTF-8 text') from None
        if line.strip():
          prompts.append(line.lstrip('\ufeff') if n == 1 else line)
    if not prompts:
      raise UserError(f'--prompt_file {path}: no prompts in it')
    return prompts
  if FLAGS.prompt is None:
    raise UserError('sample needs --prompt TEXT or --prompt_file FILE')
  try:
    FLAGS.prompt.encode('utf-8')
  except UnicodeEncodeError:   # argv bytes that are not UTF-8 arrive as lone surrogates
    raise UserError('--prompt is not UTF-8 text') from None
  return [FLAGS.prompt]


def run():
  """The `zhgpt` command (and `python main.py`)."""
  if '--version' in sys.argv[1:]:
    print(f'zhgpt-jax {__version__}')
    return
  app.run(main, flags_parser=parse_flags)
