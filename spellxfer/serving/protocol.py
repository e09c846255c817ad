"""What the API accepts: request parsing, limits and the non-thinking policy, checked before any
request reaches the model.

Every rule here turns a bad request into a 4xx with a one-line JSON error
(``{"error": {"message", "type", "code"}}``, the shape OpenAI clients read):

- the body is not JSON, not an object, or has wrong types → 400 (``invalid_request``);
- anything that asks a Qwen3 model to think → 400 (``thinking_not_allowed``): ``enable_thinking`` /
  ``thinking`` set to anything but false (top level or in ``chat_template_kwargs``), a non-null
  ``reasoning_effort`` / ``reasoning``, or Qwen3's slash-think soft switch in any message. The
  server renders prompts with spellxfer's non-thinking template, so such a request could not get
  thinking anyway; refusing it says so instead of silently ignoring the client;
- too many messages, a message over ``max_message_chars``, ``max_tokens`` over the cap, ``n`` over
  ``max_n``, more than 4 ``stop`` sequences → 400; a body over ``max_payload_bytes`` → 413
  (LitServer's size middleware);
- what this server cannot return → 400 naming the field, never a silent drop: ``logprobs`` /
  ``top_logprobs``, a ``response_format`` other than text, ``tools``;
- JSON the server cannot hold safely → 400 naming the field: a string that is not valid UTF-8 (a
  lone surrogate such as ``"\ud800"``), an integer longer than ``max_int_digits`` digits (checked
  as the JSON is parsed, long before Python's own 4,300-digit ``int`` limit), nesting deeper than
  ``max_json_depth`` levels, or ``NaN`` / ``Infinity`` (not JSON numbers);
- sampling values are held to what keeps the logits finite (``temperature`` in [0, 2], ``top_p``
  in (0, 1], ``min_p`` in [0, 1); ``max_tokens`` / ``max_completion_tokens`` and ``n`` at least 1),
  with two floors that change nothing a client could observe: a ``temperature`` below
  :data:`MIN_TEMPERATURE` is served as greedy decoding (the limit of sampling as T → 0; dividing
  by 1e-40 would overflow the logits to inf and the probabilities to NaN), and a ``top_p`` below
  :data:`MIN_TOP_P` is raised to it (both keep only the most likely token, because that token
  alone holds at least 1/151,936 > 1e-6 of the mass; 1e-300 would round to 0 in float32 and drop
  every token). ``min_p`` needs no floor: the most likely token always passes its test.

Control tokens typed into a message are not refused but neutralised: the worker tokenizes message
content as plain text (:func:`spellxfer.tasks.chat.chat_token_ids`), so
``<|im_end|>`` in a question is ten characters, not the end of the turn.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Literal

from fastapi import HTTPException
from litserve.specs.openai import ChatCompletionRequest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from spellxfer.core.errors import SpellxferError
from spellxfer.tasks.chat import SOFT_SWITCH

THINKING_FLAGS = ("enable_thinking", "thinking")
MIN_TEMPERATURE = 1e-3  # below this, sampling is greedy decoding in all but name (see the module docstring)
MIN_TOP_P = 1e-6  # smallest top_p: already keeps only the most likely token
API_KEY_ENV = "SPELLXFER_API_KEY"
REASONING_FIELDS = ("reasoning_effort", "reasoning")
ROLES = ("system", "user", "assistant")


class ApiError(HTTPException):
    """A request the client must fix: an HTTP status, a message and a machine-readable code."""

    def __init__(self, status: int, message: str, code: str = "invalid_request"):
        super().__init__(status_code=status, detail=message)
        self.code = code


class Limits(BaseModel):
    """Request limits (``serving:`` block of configs/deployment/lightning_config.yaml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_payload_bytes: int = Field(65_536, ge=1024, description="largest request body (413 above)")
    max_messages: int = Field(16, ge=1, description="messages per chat request")
    max_message_chars: int = Field(2_000, ge=1, description="characters per message / question")
    max_tokens: int = Field(256, ge=1, description="largest max_tokens a request may ask for")
    max_n: int = Field(4, ge=1, description="largest n (replies per chat request)")
    max_json_depth: int = Field(32, ge=4, le=256, description="deepest nesting of JSON arrays / objects")
    # 19 digits hold any int64 (OpenAI's `seed`); Python refuses str → int above 4,300 digits.
    max_int_digits: int = Field(19, ge=4, le=4300, description="longest JSON integer, in digits")


class PredictRequest(BaseModel):
    """``POST /predict``: one position or count question."""

    model_config = ConfigDict(extra="forbid", strict=True)

    question: str
    task: Literal["position", "count"] | None = None
    answer_kind: Literal["letter", "number"] | None = None
    max_tokens: int | None = None


class _TooLong:
    """A JSON integer past ``max_int_digits``, kept as its length so the check can name its field."""

    def __init__(self, digits: int):
        self.digits = digits


class _NotANumber:
    """``NaN`` / ``Infinity`` / ``-Infinity``: Python's json accepts them, JSON does not."""

    def __init__(self, literal: str):
        self.literal = literal


MAX_STOP = 4  # OpenAI's limit on `stop` sequences
MAX_STOP_CHARS = 64


class ChatRequest(ChatCompletionRequest):
    """LitServe's OpenAI chat request, plus ``min_p`` (vLLM's extension; one of Qwen3's sampling
    knobs), and the OpenAI fields it would otherwise drop without a word: ``seed`` (honoured) and
    ``logprobs`` / ``top_logprobs`` (refused: this server returns text only)."""

    min_p: float | None = None
    seed: int | None = None
    stream_options: dict | None = None  # {"include_usage": true}: a last chunk with the usage
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def stop_sequences(self) -> tuple[str, ...]:
        """``stop`` as a tuple (a string is one sequence)."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


def parse_json_object(body: bytes, limits: Limits) -> dict:
    """The request body as a JSON object within the limits, or a 400 naming the offending field."""

    def parse_int(digits: str):
        n = len(digits.lstrip("-"))
        return int(digits) if n <= limits.max_int_digits else _TooLong(n)

    try:
        data = json.loads(body, parse_int=parse_int, parse_constant=_NotANumber)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON ({e})") from None
    except RecursionError:  # json's C parser recurses once per level: 20,000 '[' end here
        raise ApiError(400, f"request body: JSON nested deeper than {limits.max_json_depth} levels") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(data).__name__}")
    check_json_values(data, limits)
    return data


def check_json_values(data: dict, limits: Limits) -> None:
    """400 for the first value a request may not carry: too deep, too long an integer, NaN or
    Infinity, or a string (key or value) that is not valid UTF-8. Iterative, so depth costs no stack."""
    stack: list[tuple[tuple, object, int]] = [((), data, 1)]
    while stack:
        path, value, depth = stack.pop()
        where = ".".join(map(str, path)) or "body"
        if isinstance(value, (dict, list)) and depth > limits.max_json_depth:
            raise ApiError(400, f"{where}: JSON nested deeper than {limits.max_json_depth} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, f"{where} (a key)")
                stack.append(((*path, key), item, depth + 1))
        elif isinstance(value, list):
            stack.extend(((*path, i), item, depth + 1) for i, item in enumerate(value))
        elif isinstance(value, str):
            _check_text(value, where)
        elif isinstance(value, _TooLong):
            raise ApiError(400, f"{where}: an integer of {value.digits} digits; "
                                f"the limit is {limits.max_int_digits}")
        elif isinstance(value, _NotANumber):
            raise ApiError(400, f"{where}: {value.literal} is not a JSON number")


def _check_text(text: str, where: str) -> None:
    # JSON's \uXXXX escapes can spell half a surrogate pair, which no UTF-8 text holds; the
    # tokenizer would fail on it in the middle of a batch.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"{where}: not valid UTF-8 text (a lone surrogate {text[e.start]!a} at "
                            f"character {e.start}); send each character whole") from None


def reject_thinking(data: dict, texts: list[str]) -> None:
    """400 for any request that asks for thinking (flags, reasoning fields, the soft switch)."""
    kwargs = data.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ApiError(400, "chat_template_kwargs must be an object")
    for where, source in (("", data), ("chat_template_kwargs.", kwargs or {})):
        for flag in THINKING_FLAGS:
            if source.get(flag) not in (None, False):
                raise ApiError(400, f"{where}{flag}: thinking mode is not available on this server "
                                    "(Qwen3 is served in non-thinking mode only); leave it unset or false",
                               "thinking_not_allowed")
    for field in REASONING_FIELDS:
        if data.get(field) is not None:
            raise ApiError(400, f"{field}: reasoning is not available on this server "
                                "(non-thinking mode only)", "thinking_not_allowed")
    for text in texts:
        if SOFT_SWITCH.search(text):
            raise ApiError(400, "a message contains the thinking soft switch; this server answers in "
                                "non-thinking mode only (remove it, or use /no_think)",
                           "thinking_not_allowed")


def message_texts(data: dict) -> list[str]:
    """Every string a chat request carries in its messages (before type validation)."""
    texts = []
    messages = data.get("messages")
    for m in messages if isinstance(messages, list) else []:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts += [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return texts


def validation_message(e: ValidationError) -> str:
    """The first pydantic error as ``field.path: what is wrong``."""
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"]) or "body"
    return f"{loc}: {err['msg']}" + (f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else "")


def parse_predict(body: bytes, limits: Limits) -> PredictRequest:
    """A validated :class:`PredictRequest` for ``/predict``."""
    data = parse_json_object(body, limits)
    reject_thinking(data, [data["question"]] if isinstance(data.get("question"), str) else [])
    try:
        req = PredictRequest.model_validate(data)
    except ValidationError as e:
        raise ApiError(400, validation_message(e)) from None
    if not req.question.strip():
        raise ApiError(400, "question: must not be empty")
    if len(req.question) > limits.max_message_chars:
        raise ApiError(400, f"question: {len(req.question)} characters, "
                            f"the limit is {limits.max_message_chars}")
    check_max_tokens(req.max_tokens, limits)
    return req


def parse_chat(body: bytes, limits: Limits):
    """A validated :class:`ChatRequest` for ``/v1/chat/completions``, its sampling values floored
    (see the module docstring) so that every request that passes can be generated."""
    data = parse_json_object(body, limits)
    reject_thinking(data, message_texts(data))
    try:
        req = ChatRequest.model_validate(data)
    except ValidationError as e:
        raise ApiError(400, validation_message(e)) from None
    if not isinstance(req.model, str):  # OpenAI requires it; LitServe echoes it into the reply
        raise ApiError(400, "model: must be a string (any name: this server serves one model), got null")
    if not req.messages or len(req.messages) > limits.max_messages:
        raise ApiError(400, f"messages: between 1 and {limits.max_messages} messages, "
                            f"got {len(req.messages)}")
    for i, m in enumerate(req.messages):
        if m.role not in ROLES:
            raise ApiError(400, f"messages.{i}.role: must be one of {', '.join(ROLES)}, got {m.role!r}")
        text = message_text(m.content, f"messages.{i}.content")
        if len(text) > limits.max_message_chars:
            raise ApiError(400, f"messages.{i}.content: {len(text)} characters, "
                                f"the limit is {limits.max_message_chars}")
    if req.messages[-1].role != "user":
        raise ApiError(400, "messages: the last message must come from the user")
    if req.tools:
        raise ApiError(400, "tools: tool calling is not supported by this server")
    if req.logprobs or req.top_logprobs is not None:
        field = "logprobs" if req.logprobs else "top_logprobs"
        raise ApiError(400, f"{field}: log probabilities are not returned by this server (text only); "
                            "leave it unset")
    if req.response_format is not None and req.response_format.type != "text":
        raise ApiError(400, 'response_format: only {"type": "text"} is supported, '
                            f"got {req.response_format.type!r}")
    stops = req.stop_sequences()
    if len(stops) > MAX_STOP or any(not 0 < len(x) <= MAX_STOP_CHARS for x in stops):
        raise ApiError(400, f"stop: up to {MAX_STOP} sequences of 1 to {MAX_STOP_CHARS} characters, got "
                            f"{len(stops)} of lengths {[len(x) for x in stops]}")
    check_max_tokens(req.max_completion_tokens, limits, "max_completion_tokens")
    check_max_tokens(req.max_tokens, limits)
    if req.n is not None and not 1 <= req.n <= limits.max_n:
        raise ApiError(400, f"n: must be between 1 and {limits.max_n}, got {req.n}")
    if req.temperature is not None and not 0 <= req.temperature <= 2:
        raise ApiError(400, f"temperature: must be in [0, 2], got {req.temperature}")
    if req.top_p is not None and not 0 < req.top_p <= 1:
        raise ApiError(400, f"top_p: must be in (0, 1], got {req.top_p}")
    if req.min_p is not None and not 0 <= req.min_p < 1:
        raise ApiError(400, f"min_p: must be in [0, 1), got {req.min_p}")
    floors = {"n": req.n or 1}
    if req.temperature is not None and req.temperature < MIN_TEMPERATURE:
        floors["temperature"] = 0.0
    if req.top_p is not None and req.top_p < MIN_TOP_P:
        floors["top_p"] = MIN_TOP_P
    return req.model_copy(update=floors)


def message_text(content, where: str) -> str:
    """A message's text: a string, or a list of text parts (images and audio are refused)."""
    if content is None:
        raise ApiError(400, f"{where}: must not be null")
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if getattr(part, "type", None) != "text":
            kind = getattr(part, "type", "?")
            raise ApiError(400, f"{where}: only text content is supported, got {kind!r}")
        parts.append(part.text)
    return "".join(parts)


def check_max_tokens(value: int | None, limits: Limits, field: str = "max_tokens") -> None:
    """400 unless ``value`` (when given) asks for 1 to ``limits.max_tokens`` new tokens."""
    if value is not None and not 1 <= value <= limits.max_tokens:
        raise ApiError(400, f"{field}: must be between 1 and {limits.max_tokens}, got {value}")


def resolve_api_key(flag: str | None = None, file: str | None = None, env=os.environ) -> str | None:
    """The bearer token: ``--api-key-file FILE`` or ``$SPELLXFER_API_KEY`` (neither shows in ``ps``),
    or the ``--api-key`` flag (kept for scripts; it does); None when none is set.

    A token is one run of printable ASCII without spaces, the characters an HTTP header carries
    as they are (a trailing newline in the file is dropped).
    """
    if flag and file:
        raise SpellxferError("--api-key and --api-key-file: give one "
                             "(better the file, or $SPELLXFER_API_KEY)")
    if file:
        try:
            key, source = Path(file).read_text(encoding="utf-8").strip(), f"--api-key-file {file}"
        except (OSError, UnicodeDecodeError) as e:
            why = getattr(e, "strerror", None) or e
            raise SpellxferError(f"--api-key-file {file}: cannot read ({why})") from None
        if not key:
            raise SpellxferError(f"--api-key-file {file}: the file is empty")
    else:
        key, source = flag or env.get(API_KEY_ENV) or None, "--api-key" if flag else f"${API_KEY_ENV}"
    if key is not None and not re.fullmatch(r"[\x21-\x7e]+", key):
        raise SpellxferError(f"{source}: an API key is printable ASCII without spaces or line breaks")
    return key


# Position questions ask for a letter ("What is the 3rd letter of …") or for a number ("At what
# position does 'e' first appear …"); count questions always for a number.
_ASKS_NUMBER = re.compile(r"\b(how many|position|where|count|number|index)\b", re.IGNORECASE)
_ASKS_LETTER = re.compile(r"\bletter\b", re.IGNORECASE)


def answer_kind(question: str, task: str | None, explicit: str | None) -> Literal["letter", "integer"]:
    """Which kind of answer ``parse_answer`` should look for in the reply to a ``/predict`` question."""
    if explicit is not None:
        return "letter" if explicit == "letter" else "integer"
    if task == "count":
        return "integer"
    if _ASKS_LETTER.search(question) and not _ASKS_NUMBER.search(question):
        return "letter"
    return "integer"
