"""Text in and out of a model: its tokenizer and its chat template, read from a sepweight directory.

A sepweight directory carries the source model's tokenizer files next to the weights
(``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``, ...). :class:`Tokenizer`
reads them with the ``tokenizers`` library -- never ``transformers`` -- and renders the chat
template with jinja2 in a sandbox, giving the same text as ``transformers``'
``apply_chat_template``::

    tok = Tokenizer.from_dir("smollm2-sepweight")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}],
                                     add_generation_prompt=True)
    ids = tok.encode(prompt, add_special_tokens=False)   # as transformers tokenizes a chat
    decoder = tok.decoder()                              # text of each new token, as it comes
    pieces = [decoder.add(t) for t in new_ids]           # ''.join(pieces) + decoder.flush()
                                                         #   == tok.decode(new_ids)

A driver that holds no model files can build the same tokenizer from the files' bytes
(:meth:`Tokenizer.from_files`), e.g. fetched from a node.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import PartialRunError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)
"""The files :meth:`Tokenizer.from_dir` reads (only ``tokenizer.json`` is required)."""

SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class TokenizerError(PartialRunError, ValueError):
    """The tokenizer files are missing or malformed, or an id is not in the vocabulary."""


class ChatTemplateError(PartialRunError, ValueError):
    """The chat template is missing, does not compile, or refused the messages (its own
    ``raise_exception``, e.g. roles that do not alternate)."""


class ChatTemplate:
    """A model's jinja2 chat template, compiled once in a sandbox.

    Rendering matches ``transformers``' ``apply_chat_template(..., tokenize=False)``: an immutable
    sandboxed environment with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols``
    extension, ``raise_exception``, ``strftime_now``, a ``tojson`` filter that keeps non-ASCII
    text, and the special tokens as variables (``bos_token``, ``eos_token``, ...).
    """

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None) -> None:
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if not isinstance(source, str) or not source:
            raise ChatTemplateError(f"source must be a non-empty template string, got {source!r}")
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise ChatTemplateError(f"the chat template does not compile: {exc}") from exc
        self.source = source
        self.special_tokens = dict(special_tokens or {})

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        **variables: Any,
    ) -> str:
        """The conversation as the model's prompt text.

        ``messages`` are dicts with ``role`` and ``content`` (plain JSON values: they are copied
        as such, so nothing else reaches the sandbox). ``add_generation_prompt`` appends the
        start of the assistant's turn. Extra ``variables`` override the special tokens.
        Raises :class:`ChatTemplateError` when the template refuses the messages.
        """
        from jinja2 import TemplateError

        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise ChatTemplateError(f"messages must be a list of dicts, got {type(messages)}")
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise ChatTemplateError(f"messages[{i}] must be a dict, got {message!r}")
        context = {**self.special_tokens, **variables}
        context = _plain(context)
        try:
            return self._template.render(
                messages=_plain(list(messages)),
                tools=_plain(tools),
                documents=_plain(documents),
                add_generation_prompt=bool(add_generation_prompt),
                **context,
            )
        except TemplateError as exc:
            raise ChatTemplateError(f"the chat template refused the messages: {exc}") from exc
        except (TypeError, KeyError, AttributeError) as exc:  # e.g. content not a string
            raise ChatTemplateError(f"the chat template failed on the messages: {exc}") from exc


class IncrementalDecoder:
    """Text of a growing list of token ids, one piece per token, correct across tokens that
    carry part of a character (byte-level vocabularies) or change the text before them.

    ``add(id)`` returns the new text that is now final (``""`` while a character is
    incomplete); ``flush()`` returns whatever is still held back. The concatenation of all
    pieces equals ``tokenizer.decode(ids)``. Only a short window of recent ids is re-decoded
    at each step.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] decode to text already returned
        self._read = 0

    def add(self, token_id: int) -> str:
        """Append one id; return the text it completes (possibly empty)."""
        self.ids.append(int(token_id))
        decode = self._tokenizer.decode
        before = decode(self.ids[self._prefix : self._read], skip_special_tokens=self._skip)
        after = decode(self.ids[self._prefix :], skip_special_tokens=self._skip)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """The text held back (an incomplete character at the end, as the full decode shows it)."""
        decode = self._tokenizer.decode
        before = decode(self.ids[self._prefix : self._read], skip_special_tokens=self._skip)
        after = decode(self.ids[self._prefix :], skip_special_tokens=self._skip)
        self._prefix, self._read = self._read, len(self.ids)
        return after[len(before) :]


class Tokenizer:
    """A model's tokenizer (``tokenizers`` library) with its special ids and chat template.

    Build it with :meth:`from_dir` or :meth:`from_files`. ``eos_token_ids`` holds every id that
    ends a generation: the tokenizer's ``eos_token`` and the generation config's
    ``eos_token_id`` (an int or a list) when the directory has one.
    """

    def __init__(
        self,
        tokenizer: Any,
        config: Mapping[str, Any] | None = None,
        *,
        generation_config: Mapping[str, Any] | None = None,
        chat_template: str | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self.config = dict(config or {})
        self.generation_config = dict(generation_config or {})
        self.special_tokens = {
            name: text
            for name in SPECIAL_TOKEN_NAMES
            if (text := _token_text(self.config.get(name))) is not None
        }
        if chat_template is None:
            chat_template = _template_from_config(self.config.get("chat_template"))
        self.chat_template = (
            ChatTemplate(chat_template, self.special_tokens) if chat_template else None
        )

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer:
        """Read the tokenizer files of a (sepweight or Hugging Face) model directory."""
        directory = Path(directory)
        if not (directory / "tokenizer.json").is_file():
            raise TokenizerError(
                f"directory {str(directory)!r} has no tokenizer.json: convert the model with its "
                "tokenizer (llm_sepweight copies it when the source has one)"
            )
        files = {
            name: (directory / name).read_bytes()
            for name in TOKENIZER_FILES
            if (directory / name).is_file()
        }
        return cls.from_files(files)

    @classmethod
    def from_files(cls, files: Mapping[str, bytes | str]) -> Tokenizer:
        """Build from the files' contents keyed by file name (see :data:`TOKENIZER_FILES`;
        ``tokenizer.json`` is required, unknown names are ignored)."""
        import tokenizers

        if "tokenizer.json" not in files:
            raise TokenizerError(f"files must hold 'tokenizer.json'; got {sorted(files)}")
        try:
            tokenizer = tokenizers.Tokenizer.from_str(_text(files, "tokenizer.json"))
        except Exception as exc:  # the library raises a plain Exception on bad JSON
            raise TokenizerError(f"tokenizer.json cannot be read: {exc}") from exc
        config = _json(files, "tokenizer_config.json")
        for name, value in _json(files, "special_tokens_map.json").items():
            config.setdefault(name, value)
        template = None
        if "chat_template.jinja" in files:
            template = _text(files, "chat_template.jinja")
        elif "chat_template.json" in files:
            template = _template_from_config(
                _json(files, "chat_template.json").get("chat_template")
            )
        return cls(
            tokenizer,
            config,
            generation_config=_json(files, "generation_config.json"),
            chat_template=template,
        )

    @staticmethod
    def read_files(directory: str | Path) -> dict[str, bytes]:
        """The tokenizer files of ``directory`` as bytes (what :meth:`from_files` takes)."""
        directory = Path(directory)
        return {
            n: (directory / n).read_bytes() for n in TOKENIZER_FILES if (directory / n).is_file()
        }

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, text: str | None) -> int | None:
        """The id of one token's text, or None when it is not in the vocabulary."""
        return None if text is None else self._tokenizer.token_to_id(text)

    @property
    def bos_token_id(self) -> int | None:
        """The id of ``bos_token`` (None when the model has none)."""
        return self.token_id(self.special_tokens.get("bos_token"))

    @property
    def eos_token_id(self) -> int | None:
        """The id of ``eos_token`` (None when the model has none)."""
        return self.token_id(self.special_tokens.get("eos_token"))

    @property
    def pad_token_id(self) -> int | None:
        """The id of ``pad_token`` (None when the model has none)."""
        return self.token_id(self.special_tokens.get("pad_token"))

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends a generation (tokenizer's eos, then the generation config's)."""
        ids = [] if self.eos_token_id is None else [self.eos_token_id]
        extra = self.generation_config.get("eos_token_id")
        for value in extra if isinstance(extra, list) else [extra]:
            if isinstance(value, int) and not isinstance(value, bool) and value not in ids:
                ids.append(value)
        return ids

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``. ``add_special_tokens`` applies the tokenizer's post-processor
        (a bos token for some models); a chat prompt is encoded without it, as in transformers."""
        if not isinstance(text, str):
            raise TokenizerError(f"text must be a str, got {type(text).__name__}")
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """The text of ``ids``."""
        ids = [int(i) for i in ids]
        size = self.vocab_size
        bad = [i for i in ids if not 0 <= i < size]
        if bad:
            raise TokenizerError(f"ids holds {bad[:5]}, outside the vocabulary [0, {size})")
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def decoder(self, *, skip_special_tokens: bool = True) -> IncrementalDecoder:
        """A new :class:`IncrementalDecoder` for one stream of generated ids."""
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        **variables: Any,
    ) -> str:
        """Render ``messages`` with the model's chat template (see :meth:`ChatTemplate.render`)."""
        if self.chat_template is None:
            raise ChatTemplateError(
                "this model's tokenizer files hold no chat template (chat_template.jinja or "
                "tokenizer_config.json's chat_template); use plain completions instead"
            )
        return self.chat_template.render(
            messages, add_generation_prompt=add_generation_prompt, **variables
        )


def _raise_exception(message: str) -> None:
    from jinja2 import TemplateError

    raise TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson escapes HTML characters; templates expect plain JSON
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _plain(value: Any) -> Any:
    """A copy of ``value`` made of JSON types only (what the sandbox may see)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    raise ChatTemplateError(f"a chat template gets JSON values only, got {type(value).__name__}")


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _template_from_config(value: Any) -> str | None:
    """tokenizer_config.json's ``chat_template``: a string, or a list of named templates."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        found = named.get("default")
        return found if isinstance(found, str) else None
    return None


def _text(files: Mapping[str, bytes | str], name: str) -> str:
    data = files[name]
    if isinstance(data, str):
        return data
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TokenizerError(f"files[{name!r}] must be bytes or str, got {type(data).__name__}")
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TokenizerError(f"{name} is not UTF-8 text: {exc}") from exc


def _json(files: Mapping[str, bytes | str], name: str) -> dict[str, Any]:
    if name not in files:
        return {}
    try:
        data = json.loads(_text(files, name))
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{name} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise TokenizerError(f"{name} must hold a JSON object, got {type(data).__name__}")
    return data
