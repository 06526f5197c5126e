import pytest

from llm_sepweight import PartSpec, PartSpecError


@pytest.mark.parametrize(
    "text, begin, layers, end",
    [
        ("b", True, range(0), False),
        ("e", False, range(0), True),
        ("8-16", False, range(8, 16), False),
        ("b 0-8", True, range(0, 8), False),
        ("16-30 e", False, range(16, 30), True),
        ("b 0-30 e", True, range(0, 30), True),
        ("b e", True, range(0), True),
        ("0-1", False, range(0, 1), False),
    ],
)
def test_parse_and_round_trip(text, begin, layers, end):
    spec = PartSpec.parse(text)
    assert (spec.begin, spec.layers, spec.end, spec.full) == (begin, layers, end, False)
    assert str(spec) == text
    assert PartSpec.parse(str(spec)) == spec


def test_full_round_trips_and_resolves():
    spec = PartSpec.parse("f")
    assert spec.full and str(spec) == "f"
    resolved = spec.resolve(30)
    assert str(resolved) == "b 0-30 e"
    assert resolved.is_full(30) and PartSpec.parse("b 0-30 e").is_full(30)
    assert not PartSpec.parse("b 0-29 e").is_full(30)


def test_extra_spaces_are_accepted():
    assert str(PartSpec.parse("  b   0-8 ")) == "b 0-8"


@pytest.mark.parametrize(
    "text, quoted",
    [
        ("b 0-8x", "'0-8x'"),
        ("x", "'x'"),
        ("0-8 b", "'b'"),
        ("e b", "'b'"),
        ("b b", "'b'"),
        ("0-4 4-8", "'4-8'"),
        ("8-4", "'8-4'"),
        ("3-3", "'3-3'"),
        ("f e", "'f'"),
        ("-1-3", "'-1-3'"),
        ("0-8,", "'0-8,'"),
        ("B 0-8", "'B'"),
    ],
)
def test_malformed_specs_quote_the_bad_token(text, quoted):
    with pytest.raises(PartSpecError) as info:
        PartSpec.parse(text)
    assert quoted in str(info.value)


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_spec_is_an_error(text):
    with pytest.raises(PartSpecError, match="empty"):
        PartSpec.parse(text)


def test_non_string_is_an_error():
    with pytest.raises(PartSpecError, match="string"):
        PartSpec.parse(8)  # type: ignore[arg-type]


def test_resolve_checks_layer_count():
    assert PartSpec.parse("16-30 e").resolve(30).layers == range(16, 30)
    with pytest.raises(PartSpecError, match="30 layers"):
        PartSpec.parse("16-31 e").resolve(30)


def test_spec_must_hold_something():
    with pytest.raises(PartSpecError):
        PartSpec()
