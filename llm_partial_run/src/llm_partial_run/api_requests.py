"""The OpenAI API's request fields, checked: each bad value is an :class:`ApiError` with the
status and body OpenAI would answer (the ``openai`` client raises the matching exception), found
before anything reaches the model."""

from __future__ import annotations

import hmac
import json
import math
from typing import Any, Protocol

from llm_sampler import SamplerError, SamplingConfig

from .batcher import Settings
from .text import Tokenizer


class ServedModel(Protocol):
    """What the checks need to know of the model served."""

    name: str
    tokenizer: Tokenizer
    context_len: int
    max_rows: int
    stop_token_ids: tuple[int, ...]


ROLES = ("system", "developer", "user", "assistant", "tool")
UNSUPPORTED = {  # parameter -> the values we accept (OpenAI's defaults)
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
    "best_of": (None, 1),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "response_format": (None, {"type": "text"}),
}


class ApiError(Exception):
    """A request refused with an OpenAI-shaped error body and an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code,
        )  # fmt: skip

    def body(self) -> dict[str, Any]:
        """``{"error": {"message", "type", "param", "code"}}``."""
        error = {"message": self.message, "type": self.type, "param": self.param}
        return {"error": {**error, "code": self.code}}


async def read_json_body(request: Any) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def check_key(request: Any, key: bytes | None) -> None:
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key):
        raise ApiError(401, "incorrect or missing API key: send 'Authorization: Bearer KEY'",
                       code="invalid_api_key")  # fmt: skip


def check_model(body: dict, model: ServedModel) -> None:
    name = body.get("model")
    if not isinstance(name, str):
        raise ApiError(400, f"'model' must be a string naming {model.name!r}", param="model")
    if name != model.name:
        raise ApiError(404, f"the model {name!r} does not exist; this server serves "
                       f"{model.name!r}", param="model", code="model_not_found")  # fmt: skip


_TYPES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
          dict: "an object", list: "an array"}  # fmt: skip


def get_field(body: dict, name: str, kind: type, default: Any) -> Any:
    """``body[name]`` checked to be of ``kind`` (a bool is not a number); null means default."""
    value = body.get(name)
    if value is None:
        return default
    kinds = (int, float) if kind is float else kind
    ok = isinstance(value, kinds) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and ok:
        ok = math.isfinite(value)
    if not ok:
        raise ApiError(400, f"'{name}' must be {_TYPES[kind]}, got {json.dumps(value)[:80]}",
                       param=name)  # fmt: skip
    return value


def _in_range(name: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise ApiError(400, f"'{name}' must be in {bracket}{low}, {high}], got {value}",
                       param=name)  # fmt: skip


def chat_messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'messages' must be a non-empty array of messages", param="messages")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"'{where}' must be an object", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise ApiError(400, f"'{where}.role' must be one of {', '.join(ROLES)}, got "
                           f"{json.dumps(role)}", param=f"{where}.role")  # fmt: skip
        out.append({"role": "system" if role == "developer" else role,
                    "content": _content(message.get("content"), where)})  # fmt: skip
    return out


def _content(content: Any, where: str) -> str:
    """A message's content: a string, or an array of text parts (joined by new lines)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):  # fmt: skip
                raise ApiError(400, f"'{where}.content' parts must be text parts "
                               "({'type': 'text', 'text': ...}); this model reads text only",
                               param=f"{where}.content")  # fmt: skip
            texts.append(part["text"])
        return "\n".join(texts)
    raise ApiError(400, f"'{where}.content' must be a string or an array of text parts",
                   param=f"{where}.content")  # fmt: skip


def completion_prompts(value: Any, tokenizer: Tokenizer) -> list[list[int]]:
    """A completion's prompt: a string, an array of strings, of token ids, or of id arrays."""
    if isinstance(value, str):
        value = [value]
    elif isinstance(value, list) and value and all(_is_int(t) for t in value):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'prompt' must be a string, an array of strings, an array of token "
                       "ids or an array of such arrays, and not empty", param="prompt")  # fmt: skip
    prompts = []
    for item in value:
        if isinstance(item, str):
            ids = tokenizer.encode(item)
        elif isinstance(item, list) and item and all(_is_int(t) for t in item):
            ids = list(item)
            if not all(0 <= t < tokenizer.vocab_size for t in ids):
                raise ApiError(400, f"'prompt' token ids must be in [0, {tokenizer.vocab_size})",
                               param="prompt")  # fmt: skip
        else:
            raise ApiError(400, "each prompt must be a string or a non-empty array of token ids",
                           param="prompt")  # fmt: skip
        if not ids:
            raise ApiError(400, "'prompt' must not be empty (it encodes to no token)",
                           param="prompt")  # fmt: skip
        prompts.append(ids)
    return prompts


def generation_settings(
    body: dict, model: ServedModel, prompts: list[list[int]], *, chat: bool
) -> tuple[Settings, int]:
    for name, accepted in UNSUPPORTED.items():
        if body.get(name, None) not in accepted:
            raise ApiError(400, f"'{name}' = {json.dumps(body[name])[:80]} is not supported by "
                           "this server", param=name)  # fmt: skip
    temperature = float(get_field(body, "temperature", float, 1.0))
    _in_range("temperature", temperature, 0.0, 2.0)
    top_p = float(get_field(body, "top_p", float, 1.0))
    _in_range("top_p", top_p, 0.0, 1.0, low_open=True)
    top_k = get_field(body, "top_k", int, 0)  # extensions (vLLM, llama.cpp)
    _in_range("top_k", top_k, 0, model.tokenizer.vocab_size)
    min_p = float(get_field(body, "min_p", float, 0.0))
    _in_range("min_p", min_p, 0.0, 1.0)
    penalty = float(get_field(body, "repetition_penalty", float, 1.0))
    _in_range("repetition_penalty", penalty, 0.0, 10.0, low_open=True)
    n = get_field(body, "n", int, 1)
    _in_range("n", n, 1, model.max_rows)
    if len(prompts) * n > model.max_rows:
        raise ApiError(400, f"{len(prompts)} prompts x n={n} exceed the {model.max_rows} "
                       "rows this server decodes at once", param="n")  # fmt: skip
    seed = get_field(body, "seed", int, None)
    stop = _stop(body.get("stop"))
    longest = max(len(p) for p in prompts)
    where = "messages" if chat else "prompt"
    if longest >= model.context_len:
        raise ApiError(400, f"this model's context is {model.context_len} tokens; the prompt "
                       f"has {longest}", param=where, code="context_length_exceeded")  # fmt: skip
    default = model.context_len - longest if chat else min(16, model.context_len - longest)
    max_tokens = get_field(body, "max_completion_tokens", int, None)
    name = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, name = get_field(body, "max_tokens", int, default), "max_tokens"
    _in_range(name, max_tokens, 1, 1 << 31)
    if longest + max_tokens > model.context_len:
        raise ApiError(400, f"this model's context is {model.context_len} tokens; the prompt "
                       f"({longest}) + {name} ({max_tokens}) exceed it", param=name,
                       code="context_length_exceeded")  # fmt: skip
    try:
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p,
                                  min_p=min_p, repetition_penalty=penalty)  # fmt: skip
    except SamplerError as exc:
        raise ApiError(400, str(exc)) from exc
    return Settings(max_tokens, sampling, seed, stop, model.stop_token_ids), n


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (not isinstance(stops, list) or len(stops) > 4
            or not all(isinstance(s, str) and s for s in stops)):  # fmt: skip
        raise ApiError(400, "'stop' must be a non-empty string or an array of up to 4 of them",
                       param="stop")  # fmt: skip
    return tuple(stops)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
