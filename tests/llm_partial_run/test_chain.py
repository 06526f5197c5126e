"""The chain check: every way a set of parts can fail to be one model is refused, naming the
node and the reason, before any tensor is sent."""

from __future__ import annotations

import pytest

from llm_partial_run.chain import check_chain
from llm_partial_run.errors import ChainError
from llm_partial_run.session import Pipeline
from llm_partial_run.transport import PROTOCOL_VERSION, PartInfo


class FakeLink:
    """A link that answers info() and records every other call (none must happen)."""

    def __init__(self, name: str, spec: str, **info) -> None:
        self.name = name
        fields = dict(arch="llama", spec=spec, num_layers=6, dtype="float32", device="cpu",
                      model="m", fingerprint="f1")  # fmt: skip
        self._info = PartInfo(**{**fields, **info})
        self.calls: list[str] = []

    def info(self) -> PartInfo:
        return self._info

    def __getattr__(self, name):
        def record(*args):
            self.calls.append(name)

        return record


def chain(*links: FakeLink, spares: tuple[FakeLink, ...] = ()):
    return check_chain([(x, x.info()) for x in links], [(x, x.info()) for x in spares])


def test_parts_in_any_order_are_ordered_begin_first():
    a, b, c = FakeLink("n1", "4-6 e"), FakeLink("n2", "b 0-2"), FakeLink("n3", "2-4")
    assert [x.name for x in chain(a, b, c).links] == ["n2", "n3", "n1"]


def test_begin_and_end_alone_and_full_model():
    parts = [FakeLink("e", "e"), FakeLink("m", "0-6"), FakeLink("b", "b")]
    assert [x.name for x in chain(*parts).links] == ["b", "m", "e"]
    assert [x.name for x in chain(FakeLink("f", "f")).links] == ["f"]


def test_same_part_twice_is_a_spare_and_a_spare_must_match():
    a, a2 = FakeLink("a", "b 0-3"), FakeLink("a2", "b 0-3")
    b, b2 = FakeLink("b", "3-6 e"), FakeLink("b2", "3-6 e")
    checked = chain(a, b, a2, spares=(b2,))
    assert [x.name for x in checked.links] == ["a", "b"]
    assert {i: [x.name for x in s] for i, s in checked.spares.items()} == {0: ["a2"], 1: ["b2"]}
    with pytest.raises(ChainError, match="spare c holds part '2-6 e', which no node"):
        chain(a, b, spares=(FakeLink("c", "2-6 e"),))


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        (["b 0-2", "3-6 e"], r"gap: no node holds layers 2-3 .* between node n0 and node n1"),
        (["b 0-2", "2-4"], r"gap: no node holds layers 4-6 .* after node n1"),
        (["b 0-3", "2-6 e"], r"overlap: layers 2-3 are held by node n0 and by node n1"),
        (["0-3", "3-6 e"], r"no node holds begin .* '0-3' on node n0"),
        (["b 0-3", "3-6"], r"no node holds end .* '3-6' on node n1"),
        (["b 0-3", "b", "3-6 e"], r"nodes n0 and n1 both hold begin"),
        (["b 0-3", "3-6 e", "e"], r"node n1 holds end .* but node n2 \('e'\) would come after"),
        (["b 0-6 e", "e"], r"node n0 holds end"),
    ],
)
def test_cover_errors_name_the_nodes(specs, message):
    with pytest.raises(ChainError, match=message):
        chain(*[FakeLink(f"n{i}", s) for i, s in enumerate(specs)])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("arch", "falcon", "node n1 serves architecture 'falcon', but node n0 serves 'llama'"),
        ("num_layers", 8, "node n1 serves a layer count of 8, but node n0 serves 6"),
        ("dtype", "bfloat16", "node n1 serves dtype 'bfloat16', but node n0 serves 'float32'"),
        (
            "fingerprint",
            "f2",
            "node n1 serves weights of fingerprint 'f2', but node n0 serves 'f1'",
        ),
        ("protocol", PROTOCOL_VERSION + 1, f"node n1 speaks node protocol {PROTOCOL_VERSION + 1}"),
    ],
)
def test_mismatched_parts_are_refused(field, value, message):
    with pytest.raises(ChainError, match=message):
        chain(FakeLink("n0", "b 0-3"), FakeLink("n1", "3-6 e", **{field: value}))


def test_copies_of_a_model_under_other_names_chain():
    a, b = FakeLink("n0", "b 0-3", model="sw"), FakeLink("n1", "3-6 e", model="/data/copy")
    assert [x.name for x in chain(a, b).links] == ["n0", "n1"]
    c = FakeLink("n2", "3-6 e", fingerprint="")  # a transport that does not report it
    assert [x.name for x in chain(a, c).links] == ["n0", "n2"]


def test_a_node_listed_twice_is_not_its_own_spare():
    a, b = FakeLink("n0", "b 0-3"), FakeLink("n1", "3-6 e")
    with pytest.raises(ChainError, match="node n1 is listed twice"):
        chain(a, b, spares=(b,))


def test_no_parts_and_a_bad_spec():
    with pytest.raises(ChainError, match="no parts given"):
        chain()
    with pytest.raises(ChainError, match="node n0 reports a bad part spec"):
        chain(FakeLink("n0", "b 0-9 e"))


def test_pipeline_refuses_before_sending_anything():
    links = [FakeLink("n0", "b 0-2"), FakeLink("n1", "3-6 e")]
    with pytest.raises(ChainError, match="gap"):
        Pipeline(links)
    assert [link.calls for link in links] == [[], []]  # no session opened, no tensor sent
