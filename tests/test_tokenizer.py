"""tokenizer.py: exact round trips, special tokens, HF loading, readable pieces."""

import itertools
import os
import re

from hypothesis import given, settings, strategies as st
import pytest

from zhgpt_jax import tokenizer as tokenizer_lib
from zhgpt_jax.config import SPECIAL_TOKENS, UserError

SAMPLES = [
    '村民们都很高兴，今年的收成很好！', '𠀀𪚥𰻞 (CJK ext B and later)', '👩‍💻🇨🇳 emoji',
    'e\u0301 a\u0308\u0323 combining', '  \t\n\n   whitespace   runs  ', '\x00\x01\x7f\x1b control',
    'mixed 中文 English 123 ４５６ ，。“”', '<|endoftext|><|im_start|>user\n hi<|im_end|>', '',
]


def pieces_to_bytes(pieces: list[str]) -> bytes:
  out = b''
  for piece in pieces:
    for hex_byte, char in re.findall(r'<0x([0-9A-F]{2})>|(.)', piece, re.S):
      out += bytes([int(hex_byte, 16)]) if hex_byte else char.encode()
  return out


@pytest.fixture(scope='module')
def tok(tiny_data):
  return tokenizer_lib.load_tokenizer(os.path.join(tiny_data.data_dir, 'tokenizer'))


@pytest.fixture(scope='module')
def plain(tok):
  return tokenizer_lib.as_plain_text(tok)


def test_special_tokens_are_single_ids_0_to_3(tok, plain):
  assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
  for i, t in enumerate(SPECIAL_TOKENS):
    assert tok.encode(t).ids == [i]
    assert tok.encode(f'前{t}后').ids.count(i) == 1
    assert i not in plain.encode(t).ids            # pretraining text: just characters
    assert tokenizer_lib.decode(plain, plain.encode(t).ids) == t
  assert tok.get_vocab_size() == 1000
  assert tok.encode('x').ids == plain.encode('x').ids   # nothing added around the text


@pytest.mark.parametrize('text', SAMPLES)
def test_round_trip_samples(tok, plain, text):
  assert tokenizer_lib.decode(tok, tok.encode(text).ids) == text
  assert tokenizer_lib.decode(plain, plain.encode(text).ids) == text


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec='utf-8'), max_size=60)
       | st.lists(st.sampled_from(SAMPLES + ['村', '\u3000', ' ', '\r\n', '\u200d']),
                  max_size=8).map(''.join))
def test_round_trip_any_unicode(tok, plain, text):
  assert tokenizer_lib.decode(tok, tok.encode(text).ids) == text
  assert tokenizer_lib.decode(plain, plain.encode(text).ids) == text


def test_token_pieces_are_readable(tok):
  text = '村民们都很高兴。'
  pieces = tokenizer_lib.token_pieces(tok, text)
  assert pieces[:6] == ['村', '民', '们', '都', '很', '高'] and pieces[-1] == '。'
  assert pieces_to_bytes(pieces) == text.encode()
  assert tokenizer_lib.token_pieces(tok, '我们') == ['我们']
  # A 4-byte character the tiny vocab has never merged: shown as its bytes, not 'ð łĢ'.
  assert tokenizer_lib.token_pieces(tok, '𪚥') == ['<0xF0>', '<0xAA>', '<0x9A>', '<0xA5>']
  assert tokenizer_lib.token_pieces(tok, '<|im_end|>') == ['<|im_end|>']
  for i in range(tok.get_vocab_size()):  # every token's bytes, decoded, equal its decode
    piece = tokenizer_lib._show(tokenizer_lib.token_bytes(tok, i))
    if '<0x' not in piece:
      assert piece == tokenizer_lib.decode(tok, [i])


def test_transformers_loads_it_with_the_same_ids(tiny_data, tok):
  transformers = pytest.importorskip('transformers')
  hf = transformers.AutoTokenizer.from_pretrained(os.path.join(tiny_data.data_dir, 'tokenizer'))
  for text in SAMPLES[:-2]:
    assert hf(text)['input_ids'] == tok.encode(text).ids
    assert hf.decode(tok.encode(text).ids) == text
  assert (hf.eos_token, hf.eos_token_id, hf.bos_token) == ('<|endoftext|>', 0, '<|endoftext|>')
  assert (hf.pad_token, hf.pad_token_id) == ('<|pad|>', 3)
  messages = [{'role': 'user', 'content': '你好'}, {'role': 'assistant', 'content': '好'}]
  rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert rendered == ('<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n好<|im_end|>\n'
                      '<|im_start|>assistant\n')
  assert hf(rendered)['input_ids'].count(1) == 3 and hf(rendered)['input_ids'].count(2) == 2


def test_save_load_hash(tmp_path, tok):
  tokenizer_lib.save_tokenizer(tok, str(tmp_path / 'a'))
  assert sorted(os.listdir(tmp_path / 'a')) == [
      'special_tokens_map.json', 'tokenizer.json', 'tokenizer_config.json']  # no temp files
  h = tokenizer_lib.tokenizer_hash(str(tmp_path / 'a'))
  assert len(h) == 16 and h == tokenizer_lib.tokenizer_hash(str(tmp_path / 'a' / 'tokenizer.json'))
  again = tokenizer_lib.load_tokenizer(str(tmp_path / 'a'))
  assert again.encode(SAMPLES[0]).ids == tok.encode(SAMPLES[0]).ids
  with open(tmp_path / 'a' / 'tokenizer.json', 'a', encoding='utf-8') as f:
    f.write('\n')
  assert tokenizer_lib.tokenizer_hash(str(tmp_path / 'a')) != h


def test_load_errors(tmp_path):
  with pytest.raises(UserError, match='no tokenizer at'):
    tokenizer_lib.load_tokenizer(str(tmp_path / 'nope'))
  with pytest.raises(UserError, match='no tokenizer at'):
    tokenizer_lib.tokenizer_hash(str(tmp_path / 'nope'))
  (tmp_path / 'bad').mkdir()
  (tmp_path / 'bad' / 'tokenizer.json').write_text('{not json')
  with pytest.raises(UserError, match='cannot load tokenizer'):
    tokenizer_lib.load_tokenizer(str(tmp_path / 'bad'))
  tokenizer_lib.new_tokenizer().save(str(tmp_path / 'bad' / 'tokenizer.json'))
  with pytest.raises(UserError, match='lacks the special tokens <|endoftext|>'):
    tokenizer_lib.load_tokenizer(str(tmp_path / 'bad'))


def test_training_reads_at_most_max_train_chars():
  pulled = []

  def endless():
    for i in itertools.count():
      pulled.append(i)
      yield f'第{i}句话，我们都很高兴。'

  tok = tokenizer_lib.train_tokenizer(endless(), 300, max_train_chars=5_000)
  assert len(pulled) * 10 <= 5_000 + 20
  assert tok.get_vocab_size() == 300
  assert all(tok.id_to_token(i) == t for i, t in enumerate(SPECIAL_TOKENS))
  assert len(tokenizer_lib.new_tokenizer().get_vocab()) == 0
