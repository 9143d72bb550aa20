"""A byte-level BPE tokenizer: trained with HuggingFace `tokenizers`, saved so that
`transformers.AutoTokenizer.from_pretrained(dir)` loads it with no custom code.

Byte-level means every string, in any script, encodes and decodes back exactly: there is no
normalizer and no unknown token, and the 256 byte symbols are always in the vocabulary. The
special tokens of `config.SPECIAL_TOKENS` take ids 0..3 (`<|endoftext|>` is 0).

Any other `tokenizer.json` HF loads (a pretrained model's, e.g. BERT WordPiece) works too:
its end-of-text, padding and beginning ids come from the tokenizer_config.json beside it
(`special_ids`), and its post-processor's template tokens are never added ([CLS] ... [SEP]):
documents are separated by the end-of-text id alone, as in GPT-2.

A byte symbol is not a character: '村' is the three bytes E6 9D 91, shown in vocab.json as
'æĿĳ'. `token_pieces` shows tokens the way a reader wants them: as text, with a token that
holds part of a character shown as its bytes, e.g. <0xE6>.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Iterable, Iterator

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
import tqdm

from zhgpt_jax import files
from zhgpt_jax.config import SPECIAL_TOKENS, UserError

EOT, IM_START, IM_END, PAD = SPECIAL_TOKENS
# What a tokenizer directory holds (`copy_tokenizer` copies only these).
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                   'chat_template.jinja')

# ChatML: what sft.py trains on and what `apply_chat_template` renders.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _bytes_to_unicode() -> dict[int, str]:
  # GPT-2's table: printable bytes stand for themselves, the rest are shifted past 255.
  printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
               *range(ord('®'), ord('ÿ') + 1)]
  table, shift = {}, 0
  for b in range(256):
    if b in printable:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + shift)
      shift += 1
  return table


_BYTE_OF = {c: b for b, c in _bytes_to_unicode().items()}


def new_tokenizer() -> Tokenizer:
  """An untrained byte-level BPE tokenizer (the pipeline that `train_tokenizer` trains)."""
  tok = Tokenizer(models.BPE())
  # GPT-2's pre-tokenizer regex splits text into runs of letters, digits, punctuation and
  # spaces, and BPE never merges across runs. Chinese has no spaces, so a run is a whole
  # clause between punctuation marks: BPE can learn words such as 中国人民 anywhere in it.
  # The cost is memory: clauses rarely repeat, so the trainer keeps nearly every one, about
  # 300 bytes a character read (BENCHMARKS.md) -- bounded by max_train_chars, not by the
  # corpus. Cutting runs into 2-character pieces took that to ~85 bytes but cost 12% more
  # tokens a character on val, so we keep the runs and cap max_train_chars instead.
  # add_prefix_space would insert a space that is not in the text.
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  return tok


def _capped(texts: Iterable[str], max_chars: int, progress: bool) -> Iterator[str]:
  """`texts` until max_chars characters have been given (the last one cut to fit)."""
  left = max_chars
  with tqdm.tqdm(total=max_chars, unit='char', unit_scale=True, disable=not progress,
                 desc='tokenizer: reading') as bar:
    for text in texts:
      text = text[:left]
      left -= len(text)
      bar.update(len(text))
      yield text
      if left <= 0:
        return


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
                    max_train_chars: int = 200_000_000, progress: bool = False) -> Tokenizer:
  """Trains a byte-level BPE tokenizer on at most `max_train_chars` characters of `texts`.

  Memory is bounded by max_train_chars, not by how long `texts` is (on Chinese, about 300
  bytes a character: see new_tokenizer). `progress` shows a bar. The vocabulary holds the
  special tokens, the 256 bytes and merges up to `vocab_size` (fewer if the text runs out of
  pairs seen `min_frequency` times).
  """
  tok = new_tokenizer()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress)
  tok.train_from_iterator(_capped(texts, max_train_chars, progress), trainer=trainer)
  return tok


def save_tokenizer(tok: Tokenizer, directory: str, model_max_length: int = 1024) -> None:
  """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json to `directory`.

  Each file is written under a temporary name and renamed, tokenizer.json last.
  """
  os.makedirs(directory, exist_ok=True)
  specials = dict(bos_token=EOT, eos_token=EOT, unk_token=EOT, pad_token=PAD,
                  additional_special_tokens=[IM_START, IM_END])
  config = dict(
      tokenizer_class='PreTrainedTokenizerFast', model_max_length=model_max_length,
      add_bos_token=False, add_eos_token=False, clean_up_tokenization_spaces=False,
      chat_template=CHAT_TEMPLATE, **specials)
  files.write_text(os.path.join(directory, 'special_tokens_map.json'),
                json.dumps(specials, ensure_ascii=False, indent=2))
  files.write_text(os.path.join(directory, 'tokenizer_config.json'),
                json.dumps(config, ensure_ascii=False, indent=2))
  files.write_text(os.path.join(directory, 'tokenizer.json'), tok.to_str(pretty=True))


def json_path(directory: str) -> str:
  """`directory`/tokenizer.json, or `directory` itself when it names a .json file."""
  return directory if directory.endswith('.json') else os.path.join(directory, 'tokenizer.json')


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """The ids a run needs of its tokenizer; None where the tokenizer has no such token."""
  eos: int                      # ends every document and every generation
  pad: int                      # fills packed rows (never a target)
  bos: int | None = None
  im_start: int | None = None   # ChatML
  im_end: int | None = None

  @property
  def stop(self) -> tuple[int, ...]:
    """Generation stops at these: end of text, and ChatML's end of turn."""
    return tuple(dict.fromkeys(i for i in (self.eos, self.im_end) if i is not None))


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding='utf-8') as f:
      obj = json.load(f)
  except FileNotFoundError:
    return {}
  except (OSError, ValueError) as e:
    raise UserError(f'cannot read {path}: {e}') from e
  return obj if isinstance(obj, dict) else {}


def _declared(directory: str, tok: Tokenizer) -> dict[str, int]:
  """eos/pad/bos/sep ids a tokenizer directory declares: by name in tokenizer_config.json or
  special_tokens_map.json, else by id in the model's config.json / generation_config.json."""
  out: dict[str, int] = {}
  n = tok.get_vocab_size()
  for name in ('generation_config.json', 'config.json'):
    for role in ('eos', 'pad', 'bos'):
      value = _read_json(os.path.join(directory, name)).get(f'{role}_token_id')
      value = value[0] if isinstance(value, list) and value else value
      if isinstance(value, int) and 0 <= value < n:
        out[role] = value
  for name in ('special_tokens_map.json', 'tokenizer_config.json'):
    for role in ('eos', 'pad', 'bos', 'sep'):
      value = _read_json(os.path.join(directory, name)).get(f'{role}_token')
      value = value.get('content') if isinstance(value, dict) else value
      if isinstance(value, str) and tok.token_to_id(value) is not None:
        out[role] = tok.token_to_id(value)
  return out


def special_ids(tok: Tokenizer) -> SpecialIds:
  """The special ids of `tok`: those `load_tokenizer` read from its directory, else ours."""
  found = getattr(tok, 'zhgpt_special_ids', None)
  if found is not None:
    return found
  ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
  if ids[0] is None:
    raise UserError(f'the tokenizer has no {EOT} and no declared end-of-text token')
  return SpecialIds(eos=ids[0], pad=ids[3] if ids[3] is not None else ids[0], bos=ids[0],
                    im_start=ids[1], im_end=ids[2])


def _resolve_special_ids(tok: Tokenizer, path: str) -> SpecialIds:
  # Ours name <|endoftext|> and <|pad|>; a BERT-style tokenizer (the Chinese GPT-2s) declares
  # no eos, and [SEP] ends its texts.
  d = _declared(os.path.dirname(path), tok)
  eos = d.get('eos', tok.token_to_id(EOT))
  eos = d.get('sep') if eos is None else eos
  if eos is None:
    raise UserError(f'tokenizer {path} has no end-of-text token: name one as eos_token in '
                    f'{os.path.join(os.path.dirname(path), "tokenizer_config.json")}')
  pad = d.get('pad', tok.token_to_id(PAD))
  return SpecialIds(eos=eos, pad=eos if pad is None else pad, bos=d.get('bos'),
                    im_start=tok.token_to_id(IM_START), im_end=tok.token_to_id(IM_END))


def load_tokenizer(directory: str) -> Tokenizer:
  """Loads `directory`/tokenizer.json (or a tokenizer.json path), with its special ids.

  The post-processor is dropped (no template tokens are ever added); `special_ids(tok)`
  gives the ids the directory declares. Raises UserError when the file is missing or
  unreadable, or no end-of-text token can be found.
  """
  path = json_path(directory)
  if not os.path.isfile(path):
    raise UserError(f'no tokenizer at {directory}: {path} does not exist')
  try:
    tok = Tokenizer.from_file(path)
  except Exception as e:  # tokenizers raises a bare Exception for a bad file
    raise UserError(f'cannot load tokenizer {path}: {e}') from e
  if tok.token_to_id(EOT) is None and not os.path.isfile(
      os.path.join(os.path.dirname(path), 'tokenizer_config.json')):
    raise UserError(f'tokenizer {path} lacks the special tokens {EOT} and has no '
                    'tokenizer_config.json naming its own')
  tok.post_processor = None
  tok.zhgpt_special_ids = _resolve_special_ids(tok, path)
  return tok


def has_chatml(tok: Tokenizer) -> bool:
  return tok.token_to_id(IM_START) is not None and tok.token_to_id(IM_END) is not None


def chatml_vocab_size(directory: str) -> int:
  """The vocab size of `directory`'s tokenizer once `add_chatml` has given it the ChatML tokens."""
  tok = load_tokenizer(directory)
  return tok.get_vocab_size() + sum(tok.token_to_id(t) is None for t in (IM_START, IM_END))


def copy_tokenizer(src: str, dst: str) -> None:
  """Copies the tokenizer files of directory `src` (the very bytes) into `dst`, replacing it.

  A source without tokenizer_config.json (a bare tokenizer.json, or an HF directory that
  declares its ids only in config.json) gets one naming its special tokens, so the copy
  resolves to the same `special_ids`.
  """
  tok = load_tokenizer(src)
  src_dir = src if not src.endswith('.json') else os.path.dirname(src)
  files.sweep(os.path.dirname(os.path.abspath(dst)), of=dst)   # the user's folder: ours only
  tmp = files.temp_path(dst)
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  shutil.copyfile(json_path(src), os.path.join(tmp, 'tokenizer.json'))
  for name in TOKENIZER_FILES[1:] if not src.endswith('.json') else ():
    if os.path.isfile(os.path.join(src_dir, name)):
      shutil.copyfile(os.path.join(src_dir, name), os.path.join(tmp, name))
  config = _read_json(os.path.join(tmp, 'tokenizer_config.json'))
  ids = special_ids(tok)
  for role in ('eos', 'pad', 'bos'):
    if getattr(ids, role) is not None and not config.get(f'{role}_token'):
      config[f'{role}_token'] = tok.id_to_token(getattr(ids, role))
  config.setdefault('tokenizer_class', 'PreTrainedTokenizerFast')
  files.write_text(os.path.join(tmp, 'tokenizer_config.json'),
                json.dumps(config, ensure_ascii=False, indent=2))
  files.replace_dir(tmp, dst)


def add_chatml(directory: str) -> bool:
  """Gives the tokenizer in `directory` the ChatML tokens it lacks (appended as new ids) and
  the ChatML chat template; returns whether it changed anything."""
  tok = Tokenizer.from_file(json_path(directory))
  missing = [t for t in (IM_START, IM_END) if tok.token_to_id(t) is None]
  config_path = os.path.join(directory, 'tokenizer_config.json')
  config = _read_json(config_path)
  if not missing and config.get('chat_template'):
    return False
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
  extra = config.get('additional_special_tokens') or []
  config['additional_special_tokens'] = extra + [t for t in missing if t not in extra]
  config['chat_template'] = CHAT_TEMPLATE
  files.write_text(os.path.join(directory, 'chat_template.jinja'), CHAT_TEMPLATE)
  files.write_text(config_path, json.dumps(config, ensure_ascii=False, indent=2))
  files.write_text(os.path.join(directory, 'tokenizer.json'), tok.to_str(pretty=True))
  return True


def tokenizer_hash(directory: str) -> str:
  """The sha256 (16 hex digits) of `directory`/tokenizer.json's bytes; UserError if missing."""
  path = json_path(directory)
  try:
    with open(path, 'rb') as f:
      return hashlib.sha256(f.read()).hexdigest()[:16]
  except OSError as e:
    raise UserError(f'no tokenizer at {directory}: {e}') from e


def as_plain_text(tok: Tokenizer) -> Tokenizer:
  """A copy of `tok` that reads special-token strings in its input as plain text.

  Pretraining text uses it: a scraped page that contains '<|endoftext|>' must not end the
  document there. Chat formatting inserts special ids on purpose instead.
  """
  plain = Tokenizer.from_str(tok.to_str())
  plain.encode_special_tokens = True
  return plain


def decode(tok: Tokenizer, ids: Iterable[int]) -> str:
  """The text of `ids`, special tokens included, so decode(encode(s)) == s for every s."""
  return tok.decode(list(ids), skip_special_tokens=False)


def _show(data: bytes) -> str:
  """`data` as text, with the bytes that are not whole UTF-8 characters shown as <0xE6>."""
  out = []
  while data:
    try:
      out.append(data.decode('utf-8'))
      break
    except UnicodeDecodeError as e:
      out.append(data[:e.start].decode('utf-8'))
      out.append(f'<0x{data[e.start]:02X}>')
      data = data[e.start + 1:]
  return ''.join(out)


def token_bytes(tok: Tokenizer, token_id: int) -> bytes:
  """The bytes token `token_id` stands for (a special token: its text in UTF-8)."""
  token = tok.id_to_token(token_id)
  if token in SPECIAL_TOKENS or any(c not in _BYTE_OF for c in token):
    return token.encode('utf-8')
  return bytes(_BYTE_OF[c] for c in token)


def token_pieces(tok: Tokenizer, text: str) -> list[str]:
  """`text` as the readable text of each of its tokens, e.g. ['村民', '们', '<0xE5>', ...]."""
  return [_show(token_bytes(tok, i)) for i in tok.encode(text).ids]
