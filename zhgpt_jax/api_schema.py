"""The OpenAI request bodies the server accepts, and its errors in OpenAI's shape.

Requests are pydantic models (strict types: "5" is not a number); a field OpenAI defines but
we do not implement (n > 1, tools, best_of, suffix) is refused by name rather than ignored,
and so is a combination we do not serve (logprobs or echo or several prompts with stream).
Unknown fields are ignored, as OpenAI's server does. Every error is
{"error": {"message", "type", "param", "code"}} with a 4xx status.
"""

from __future__ import annotations

import json
import re
from typing import Literal, Union

import pydantic
from pydantic import BaseModel, ConfigDict, Field


_SURROGATE = re.compile('[\ud800-\udfff]')


class ApiError(Exception):
  """An error answered as OpenAI answers it: `status` and {"error": {...}}."""

  def __init__(self, status: int, message: str, param: str | None = None,
               code: str | None = None, kind: str = 'invalid_request_error'):
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

  def body(self) -> dict:
    return dict(error=dict(message=self.message, type=self.kind, param=self.param, code=self.code))


class _Strict(BaseModel):
  model_config = ConfigDict(strict=True, extra='ignore')


class TextPart(_Strict):
  type: Literal['text']
  text: str


class Message(_Strict):
  role: Literal['system', 'developer', 'user', 'assistant']
  content: Union[str, list[TextPart]]
  name: str | None = None

  def text(self) -> str:
    return self.content if isinstance(self.content, str) else ''.join(
        p.text for p in self.content)


class StreamOptions(_Strict):
  include_usage: bool = False


class Sampling(_Strict):
  """The fields both endpoints share; None = the server's default (config.sample)."""
  model: str
  max_tokens: int | None = Field(None, ge=1)
  temperature: float | None = Field(None, ge=0, le=2)
  top_p: float | None = Field(None, gt=0, le=1)
  top_k: int | None = Field(None, ge=0)
  repetition_penalty: float | None = Field(None, gt=0, le=10)
  stop: Union[str, list[str], None] = None
  seed: int | None = None
  n: int = Field(1, ge=1, le=1)
  stream: bool = False
  stream_options: StreamOptions | None = None
  # Defined by OpenAI, not implemented here: refused when set, so no one trusts a no-op.
  tools: list | None = None
  best_of: int | None = None

  def stops(self) -> list[str]:
    stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
      raise ApiError(400, 'stop: at most 4 non-empty strings', 'stop')
    return stop

  def check_unsupported(self) -> None:
    used = dict(tools=bool(self.tools), best_of=self.best_of not in (None, 1))
    for name in (n for n, on in used.items() if on):
      raise ApiError(400, f'{name} is not supported by this server', name, 'unsupported')


class ChatRequest(Sampling):
  messages: list[Message] = Field(min_length=1)
  max_completion_tokens: int | None = Field(None, ge=1)
  logprobs: bool | None = None
  top_logprobs: int | None = Field(None, ge=0, le=20)

  def check_unsupported(self) -> None:
    super().check_unsupported()
    if self.top_logprobs is not None and not self.logprobs:
      raise ApiError(400, 'top_logprobs needs logprobs: true', 'top_logprobs')
    if self.logprobs and self.stream:
      raise ApiError(400, 'logprobs is not supported with stream by this server', 'logprobs',
                     'unsupported')


class CompletionRequest(Sampling):
  """Several prompts (a list of strings, or of token id lists) are several choices, each
  with its index. max_tokens=0 with echo scores the prompt only."""
  prompt: Union[str, list[int], list[str], list[list[int]]]
  max_tokens: int | None = Field(None, ge=0)
  echo: bool = False
  logprobs: int | None = Field(None, ge=0, le=20)
  suffix: str | None = None

  def prompts(self) -> list:
    """The prompts, each a str or a list of token ids."""
    p = self.prompt
    if isinstance(p, str) or (p and isinstance(p[0], int)):
      return [p]
    if not p:
      raise ApiError(400, 'prompt: an empty list (give a prompt text, or its token ids)',
                     'prompt')
    return list(p)

  def check_unsupported(self) -> None:
    super().check_unsupported()
    if self.suffix:
      raise ApiError(400, 'suffix is not supported by this server', 'suffix', 'unsupported')
    if self.max_tokens == 0 and not self.echo:
      raise ApiError(400, 'max_tokens=0 asks for nothing without echo: true', 'max_tokens')
    if self.stream:
      for name, used in (('logprobs', self.logprobs is not None), ('echo', self.echo),
                         ('prompt', len(self.prompts()) > 1)):
        if used:
          raise ApiError(400, f'{name} is not supported with stream by this server'
                         + (' (one prompt a stream)' if name == 'prompt' else ''), name,
                         'unsupported')


def _unencodable(value, path: str = '') -> str | None:
  """The dotted path ('messages.0.content') of the first string in `value` holding a lone
  surrogate, keys included; None when every string is text."""
  if isinstance(value, str):
    return path if _SURROGATE.search(value) else None
  items = value.items() if isinstance(value, dict) else enumerate(value) \
      if isinstance(value, list) else ()
  for key, item in items:
    if isinstance(key, str) and _SURROGATE.search(key):
      return f'a key of {path or "the body"}'
    here = f'{path}.{key}' if path else str(key)
    found = _unencodable(item, here)
    if found is not None:
      return found
  return None


def parse(model_cls, body: bytes):
  """`body` as a `model_cls`; ApiError(400) naming the first bad field."""
  try:
    data = json.loads(body)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ApiError(400, f'the body is not valid JSON: {e}', code='invalid_json') from None
  if not isinstance(data, dict):
    raise ApiError(400, 'the body must be a JSON object')
  where = _unencodable(data)
  if where is not None:   # valid JSON ("\ud800"), but not text: nothing could encode it
    raise ApiError(400, f'{where or "body"}: a lone surrogate (\\ud800-\\udfff) is not text',
                   where or None)
  try:
    req = model_cls.model_validate(data)
  except pydantic.ValidationError as e:
    err = e.errors()[0]
    where = '.'.join(str(x) for x in err['loc'] if not str(x).startswith(('str', 'list[')))
    raise ApiError(400, f'{where or "body"}: {err["msg"]}', where or None) from None
  req.check_unsupported()
  return req
