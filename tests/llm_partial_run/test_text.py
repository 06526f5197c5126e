"""llm_partial_run.text: the tokenizer and chat template of a sepweight directory, against
transformers reading the same SmolLM2 GGUF."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from llm_partial_run.text import (
    ChatTemplate,
    ChatTemplateError,
    Tokenizer,
    TokenizerError,
)

TEXTS = [
    "Hello world!",
    "  leading spaces,\ttabs\n\nand new lines",
    "Unicode: é à ß — 日本語の文章 😀🤖👍🏽",
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
    "code: def f(x):\n    return x ** 2  # comment",
]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Colour of the sky?"},
    ],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Écris « bonjour » en 日本語 😀"},
    ],
]


@pytest.fixture(scope="module")
def tok(smollm2_sepweight: Path) -> Tokenizer:
    return Tokenizer.from_dir(smollm2_sepweight)


@pytest.fixture(scope="module")
def hf_tok(smollm2_gguf: Path):
    """transformers' tokenizer read from the GGUF itself (not from our converted files)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name
    )


def test_conversion_writes_the_files_read(smollm2_sepweight: Path) -> None:
    names = set(Tokenizer.read_files(smollm2_sepweight))
    assert {"tokenizer.json", "tokenizer_config.json"} <= names
    assert (
        "chat_template.jinja" in names
        or "chat_template" in (smollm2_sepweight / "tokenizer_config.json").read_text()
    )


@pytest.mark.parametrize("chat", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_equals_transformers(tok, hf_tok, chat, add_generation_prompt) -> None:
    ours = tok.apply_chat_template(chat, add_generation_prompt=add_generation_prompt)
    theirs = hf_tok.apply_chat_template(
        chat, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    assert ours == theirs
    theirs_ids = hf_tok.apply_chat_template(
        chat, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    assert tok.encode(ours, add_special_tokens=False) == list(theirs_ids)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_equal_transformers(tok, hf_tok, text) -> None:
    ids = tok.encode(text)
    assert ids == hf_tok(text)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids)
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)


def test_special_ids(tok, hf_tok) -> None:
    assert tok.eos_token_id == hf_tok.eos_token_id == 2
    assert tok.bos_token_id == hf_tok.bos_token_id
    assert tok.eos_token_ids == [2]
    assert tok.vocab_size == len(hf_tok)


def test_generation_config_adds_eos_ids(smollm2_sepweight: Path) -> None:
    files = Tokenizer.read_files(smollm2_sepweight)
    files["generation_config.json"] = b'{"eos_token_id": [2, 0]}'
    assert Tokenizer.from_files(files).eos_token_ids == [2, 0]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_decoder_joins_to_the_full_decode(tok, text) -> None:
    ids = tok.encode(text)
    for skip in (True, False):
        decoder = tok.decoder(skip_special_tokens=skip)
        pieces = [decoder.add(i) for i in ids]
        assert "".join(pieces) + decoder.flush() == tok.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in p for p in pieces)


def test_incremental_decoder_holds_back_partial_characters(tok) -> None:
    ids = tok.encode("😀")
    assert len(ids) > 1  # the emoji's bytes span several byte-level tokens
    decoder = tok.decoder()
    assert [decoder.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert decoder.add(ids[-1]) == "😀"


def test_incremental_decoder_on_random_ids(tok) -> None:
    """Arbitrary ids (many byte tokens that form no character): pieces still add up."""
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        decoder = tok.decoder()
        text = "".join(decoder.add(i) for i in ids) + decoder.flush()
        assert text == tok.decode(ids)


def test_from_files_equals_from_dir(tok, smollm2_sepweight: Path) -> None:
    files = Tokenizer.read_files(smollm2_sepweight)
    other = Tokenizer.from_files(
        {k: v.decode() if k.endswith("jinja") else v for k, v in files.items()}
    )
    for text in TEXTS:
        assert other.encode(text) == tok.encode(text)
    assert other.apply_chat_template(CHATS[2], add_generation_prompt=True) == (
        tok.apply_chat_template(CHATS[2], add_generation_prompt=True)
    )
    assert other.eos_token_ids == tok.eos_token_ids


def test_template_in_tokenizer_config(smollm2_sepweight: Path, tok) -> None:
    """Older conversions keep the template in tokenizer_config.json (a string or a named list)."""
    import json

    files = Tokenizer.read_files(smollm2_sepweight)
    source = tok.chat_template.source
    files.pop("chat_template.jinja", None)
    config = json.loads(files["tokenizer_config.json"])
    for value in (
        source,
        [{"name": "tool_use", "template": "x"}, {"name": "default", "template": source}],
    ):
        config["chat_template"] = value
        files["tokenizer_config.json"] = json.dumps(config).encode()
        assert Tokenizer.from_files(files).apply_chat_template(CHATS[0]) == (
            tok.apply_chat_template(CHATS[0])
        )


def test_template_errors() -> None:
    refuse = ChatTemplate(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}ok"
    )
    assert refuse.render([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ChatTemplateError, match="user first"):
        refuse.render([{"role": "assistant", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for %}")
    with pytest.raises(ChatTemplateError, match="messages"):
        refuse.render("not a list")


def test_template_is_sandboxed() -> None:
    escape = ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError):
        escape.render([])
    assert ChatTemplate("{{ x.__class__ }}").render([], x="s") == ""


def test_template_features_match_transformers() -> None:
    """Whitespace control, loop controls, tojson, special tokens: as transformers renders."""
    utils = pytest.importorskip("transformers.utils.chat_template_utils")
    source = (
        "{% for m in messages %}\n  {% if loop.index > 2 %}{% break %}{% endif %}\n"
        "  {{ m | tojson }}\n{% endfor %}{{ bos_token }}{{ add_generation_prompt }}"
    )
    messages = [{"role": "user", "content": "é<b>"}] * 3
    ours = ChatTemplate(source, {"bos_token": "<s>"}).render(messages)
    theirs = utils.render_jinja_template([messages], chat_template=source, bos_token="<s>")[0][0]
    assert ours == theirs
    assert ours.count('"é<b>"') == 2 and ours.endswith("<s>False")


def test_tokenizer_errors(tmp_path: Path, tok, smollm2_sepweight: Path) -> None:
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_files({"tokenizer.json": b"{not json"})
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(TokenizerError, match="text"):
        tok.encode(3)
    bare = Tokenizer.from_files(
        {"tokenizer.json": (smollm2_sepweight / "tokenizer.json").read_bytes()}
    )
    assert bare.eos_token_ids == [] and bare.chat_template is None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        bare.apply_chat_template(CHATS[0])
