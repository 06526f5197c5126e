"""llm_partial_run: serve parts of a model on nodes, chain them into a pipeline, run it.

    from llm_partial_run import LocalModel, Pipeline

    with Pipeline(["127.0.0.1:5001", "127.0.0.1:5002"]) as pipeline:   # nodes, any order
        with pipeline.session(batch_size=1, max_len=256) as session:    # f(ids, mask) -> logits
            ...

``LocalModel(directory)`` gives the same sessions over parts in this process. See the README.
"""

from .chain import Chain, check_chain
from .errors import ChainError, NodeError, PartialRunError, SessionError
from .local import LocalLink
from .node import Node, serve
from .parts import load_any_part
from .remote import RemoteLink
from .session import LinkTiming, LocalModel, Pipeline, Session, StepStats
from .text import ChatTemplate, Tokenizer
from .transport import PROTOCOL_VERSION, PartInfo, PartLink

__all__ = [
    "PROTOCOL_VERSION", "Chain", "ChainError", "LinkTiming", "LocalLink", "LocalModel", "Node",
    "NodeError", "PartInfo", "PartLink", "PartialRunError", "Pipeline", "RemoteLink", "Session",
    "SessionError", "StepStats", "ChatTemplate", "Tokenizer", "check_chain", "load_any_part",
    "serve",
]  # fmt: skip
