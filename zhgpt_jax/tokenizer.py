"""A byte-level BPE tokenizer: trained with HuggingFace `tokenizers`, saved so that
`transformers.AutoTokenizer.from_pretrained(dir)` loads it with no custom code.

Byte-level means every string, in any script, encodes and decodes back exactly: there is no
normalizer and no unknown token, and the 256 byte symbols are always in the vocabulary. The
special tokens of `config.SPECIAL_TOKENS` take ids 0..3 (`<|endoftext|>` is 0).

A byte symbol is not a character: '村' is the three bytes E6 9D 91, shown in vocab.json as
'æĿĳ'. `token_pieces` shows tokens the way a reader wants them: as text, with a token that
holds part of a character shown as its bytes, e.g. <0xE6>.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
import tqdm

from zhgpt_jax.config import SPECIAL_TOKENS, UserError

EOT, IM_START, IM_END, PAD = SPECIAL_TOKENS

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


def _write_atomic(path: str, text: str) -> None:
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write(text)
  os.replace(tmp, path)


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
  _write_atomic(os.path.join(directory, 'special_tokens_map.json'),
                json.dumps(specials, ensure_ascii=False, indent=2))
  _write_atomic(os.path.join(directory, 'tokenizer_config.json'),
                json.dumps(config, ensure_ascii=False, indent=2))
  _write_atomic(os.path.join(directory, 'tokenizer.json'), tok.to_str(pretty=True))


def json_path(directory: str) -> str:
  """`directory`/tokenizer.json, or `directory` itself when it names a .json file."""
  return directory if directory.endswith('.json') else os.path.join(directory, 'tokenizer.json')


def load_tokenizer(directory: str) -> Tokenizer:
  """Loads `directory`/tokenizer.json (or a tokenizer.json path).

  Raises UserError when it is missing, unreadable, or lacks the special tokens.
  """
  path = json_path(directory)
  if not os.path.isfile(path):
    raise UserError(f'no tokenizer at {directory}: {path} does not exist')
  try:
    tok = Tokenizer.from_file(path)
  except Exception as e:  # tokenizers raises a bare Exception for a bad file
    raise UserError(f'cannot load tokenizer {path}: {e}') from e
  missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
  if missing:
    raise UserError(f'tokenizer {path} lacks the special tokens {", ".join(missing)}')
  return tok


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
