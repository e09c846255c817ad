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
  ``max_n`` → 400; a body over ``max_payload_bytes`` → 413 (LitServer's size middleware).
"""

from __future__ import annotations

import json
import re
from typing import Literal

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from spellxfer.policy import SOFT_SWITCH

THINKING_FLAGS = ("enable_thinking", "thinking")
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


class PredictRequest(BaseModel):
    """``POST /predict``: one position or count question."""

    model_config = ConfigDict(extra="forbid", strict=True)

    question: str
    task: Literal["position", "count"] | None = None
    answer_kind: Literal["letter", "number"] | None = None
    max_tokens: int | None = None


def parse_json_object(body: bytes) -> dict:
    """The request body as a JSON object, or a 400."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(data).__name__}")
    return data


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
                               "thinking_not_allowed")  # fmt: skip
    for field in REASONING_FIELDS:
        if data.get(field) is not None:
            raise ApiError(400, f"{field}: reasoning is not available on this server (non-thinking mode only)",
                           "thinking_not_allowed")  # fmt: skip
    for text in texts:
        if SOFT_SWITCH.search(text):
            raise ApiError(400, "a message contains the thinking soft switch; this server answers in "
                                "non-thinking mode only (remove it, or use /no_think)", "thinking_not_allowed")  # fmt: skip


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
    data = parse_json_object(body)
    reject_thinking(data, [data["question"]] if isinstance(data.get("question"), str) else [])
    try:
        req = PredictRequest.model_validate(data)
    except ValidationError as e:
        raise ApiError(400, validation_message(e)) from None
    if not req.question.strip():
        raise ApiError(400, "question: must not be empty")
    if len(req.question) > limits.max_message_chars:
        raise ApiError(400, f"question: {len(req.question)} characters, the limit is {limits.max_message_chars}")
    check_max_tokens(req.max_tokens, limits)
    return req


def parse_chat(body: bytes, limits: Limits):
    """A validated ``ChatCompletionRequest`` (LitServe's OpenAI model) for ``/v1/chat/completions``."""
    from litserve.specs.openai import ChatCompletionRequest

    data = parse_json_object(body)
    reject_thinking(data, message_texts(data))
    try:
        req = ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        raise ApiError(400, validation_message(e)) from None
    if not req.messages or len(req.messages) > limits.max_messages:
        raise ApiError(400, f"messages: between 1 and {limits.max_messages} messages, got {len(req.messages)}")
    for i, m in enumerate(req.messages):
        if m.role not in ROLES:
            raise ApiError(400, f"messages.{i}.role: must be one of {', '.join(ROLES)}, got {m.role!r}")
        text = message_text(m.content, f"messages.{i}.content")
        if len(text) > limits.max_message_chars:
            raise ApiError(400, f"messages.{i}.content: {len(text)} characters, the limit is {limits.max_message_chars}")
    if req.messages[-1].role != "user":
        raise ApiError(400, "messages: the last message must come from the user")
    if req.tools:
        raise ApiError(400, "tools: tool calling is not supported by this server")
    check_max_tokens(req.max_completion_tokens or req.max_tokens, limits)
    if not 1 <= (req.n or 1) <= limits.max_n:
        raise ApiError(400, f"n: must be between 1 and {limits.max_n}, got {req.n}")
    if req.temperature is not None and not 0 <= req.temperature <= 2:
        raise ApiError(400, f"temperature: must be in [0, 2], got {req.temperature}")
    if req.top_p is not None and not 0 < req.top_p <= 1:
        raise ApiError(400, f"top_p: must be in (0, 1], got {req.top_p}")
    return req


def message_text(content, where: str) -> str:
    """A message's text: a string, or a list of text parts (images and audio are refused)."""
    if content is None:
        raise ApiError(400, f"{where}: must not be null")
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if getattr(part, "type", None) != "text":
            raise ApiError(400, f"{where}: only text content is supported, got {getattr(part, 'type', '?')!r}")
        parts.append(part.text)
    return "".join(parts)


def check_max_tokens(value: int | None, limits: Limits) -> None:
    if value is not None and not 1 <= value <= limits.max_tokens:
        raise ApiError(400, f"max_tokens: must be between 1 and {limits.max_tokens}, got {value}")


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
