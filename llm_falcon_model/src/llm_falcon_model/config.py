"""The Falcon config: a frozen dataclass read from a Hugging Face ``config.json``.

Hugging Face spells one Falcon as a handful of overlapping switches (``new_decoder_architecture``,
``multi_query``, ``parallel_attn``, ``num_ln_in_parallel_attn``, ...), some of which are ignored
depending on the others. :meth:`FalconConfig.from_hf` resolves them, the way ``transformers`` does,
into two plain choices the model code reads:

- ``qkv_layout`` -- how the fused ``query_key_value`` projection is laid out:
  ``"grouped"`` (new decoder architecture: per KV group ``[q ... q, k, v]``),
  ``"multi_query"`` (``[all q heads, k, v]``, one KV head) or ``"per_head"``
  (``[q, k, v]`` per head);
- ``block`` -- how a decoder layer wires its norms and residuals: ``"parallel"`` (one norm feeds
  attention and MLP), ``"parallel_two_norms"`` (``ln_attn`` and ``ln_mlp``) or ``"sequential"``.

Anything ``transformers``' ``FalconForCausalLM`` would not run (or would run differently from what
the config says) is refused here with a :class:`FalconModelError` naming the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import FalconModelError

MODEL_TYPES = ("falcon", "RefinedWeb", "RefinedWebModel")
QKV_LAYOUTS = ("grouped", "multi_query", "per_head")
BLOCKS = ("parallel", "parallel_two_norms", "sequential")
ACTIVATIONS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "relu", "silu", "swish")
ROPE_TYPES = ("default", "linear")

# Keys of the pre-transformers "RefinedWeb" checkpoints and their Hugging Face names.
_LEGACY_KEYS = {
    "n_embed": "hidden_size",
    "n_head": "num_attention_heads",
    "n_layer": "num_hidden_layers",
    "n_head_kv": "num_kv_heads",
}


@dataclass(frozen=True)
class FalconConfig:
    """Everything the model code needs to know about one Falcon, validated at construction.

    ``num_kv_heads`` is the number of key/value heads actually computed and cached: 1 for
    multi-query (Falcon-7B), the group count for the new decoder architecture (8 for Falcon-40B),
    ``num_heads`` for plain multi-head attention (Falcon-RW).
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    qkv_layout: str
    block: str
    ffn_hidden_size: int
    activation: str = "gelu"
    bias: bool = False
    alibi: bool = False
    rope_theta: float = 10000.0
    rope_linear_factor: float = 1.0
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads"):
            _check_positive_int(name, getattr(self, name))
        _check_positive_int("ffn_hidden_size", self.ffn_hidden_size)
        _check_choice("qkv_layout", self.qkv_layout, QKV_LAYOUTS)
        _check_choice("block", self.block, BLOCKS)
        _check_choice("activation", self.activation, ACTIVATIONS)
        if self.hidden_size % self.num_heads:
            raise FalconModelError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_heads "
                f"({self.num_heads})"
            )
        self._check_kv_heads()
        if not self.alibi and self.head_dim % 2:
            raise FalconModelError(
                f"rotary embeddings need an even head dim, got hidden_size / num_heads = "
                f"{self.head_dim}"
            )
        if not (self.rope_theta > 0 and self.rope_linear_factor > 0):
            raise FalconModelError("rope_theta and the rope scaling factor must be positive")
        if not (self.layer_norm_epsilon > 0):
            raise FalconModelError(
                f"layer_norm_epsilon must be positive, got {self.layer_norm_epsilon}"
            )

    def _check_kv_heads(self) -> None:
        kv, heads = self.num_kv_heads, self.num_heads
        if self.qkv_layout == "multi_query" and kv != 1:
            raise FalconModelError(f"num_kv_heads must be 1 for multi-query attention, got {kv}")
        if self.qkv_layout == "per_head" and kv != heads:
            raise FalconModelError(
                f"num_kv_heads ({kv}) must equal num_heads ({heads}) for multi-head attention"
            )
        if heads % kv:
            raise FalconModelError(f"num_heads ({heads}) must be a multiple of num_kv_heads ({kv})")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads

    def kv_bytes_per_token(self, dtype_size: int, num_layers: int | None = None) -> int:
        """KV-cache bytes per token: ``2 x layers x num_kv_heads x head_dim x dtype_size``."""
        layers = self.num_layers if num_layers is None else num_layers
        return 2 * layers * self.num_kv_heads * self.head_dim * dtype_size

    @classmethod
    def from_hf(cls, source: Mapping[str, Any] | str | Path) -> FalconConfig:
        """Build from a Hugging Face Falcon config: a dict, a ``config.json`` or its directory.

        Accepts ``model_type`` ``"falcon"`` and the older ``"RefinedWeb"`` (new decoder
        architecture) / ``"RefinedWebModel"`` with their ``n_head``-style keys.
        """
        hf = _read_hf(source)
        model_type = hf.get("model_type", "falcon")
        if model_type not in MODEL_TYPES:
            raise FalconModelError(f"model_type {model_type!r} is not a Falcon ({MODEL_TYPES})")
        for old, new in _LEGACY_KEYS.items():
            if old in hf and new not in hf:
                hf[new] = hf[old]
        if hf.get("apply_residual_connection_post_layernorm"):
            raise FalconModelError(
                "apply_residual_connection_post_layernorm=True is not run by transformers' Falcon"
            )
        new_arch = bool(hf.get("new_decoder_architecture", model_type == "RefinedWeb"))
        heads = _required(hf, "num_attention_heads")
        layout, kv_heads = _attention_layout(hf, new_arch, heads)
        alibi = bool(hf.get("alibi", False))
        theta, factor = (10000.0, 1.0) if alibi else _rope(hf)
        hidden = _required(hf, "hidden_size")
        return cls(
            vocab_size=_required(hf, "vocab_size"),
            hidden_size=hidden,
            num_layers=_required(hf, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            qkv_layout=layout,
            block=_block(hf, new_arch),
            ffn_hidden_size=hf.get("ffn_hidden_size") or 4 * hidden,
            activation=hf.get("activation", "gelu"),
            bias=bool(hf.get("bias", False)),
            alibi=alibi,
            rope_theta=theta,
            rope_linear_factor=factor,
            layer_norm_epsilon=_not_none(hf, "layer_norm_epsilon", 1e-5),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        )


def _read_hf(source: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FalconModelError(f"cannot read a Falcon config from {path}: {exc}") from exc


def _required(hf: Mapping[str, Any], key: str) -> Any:
    if key not in hf:
        raise FalconModelError(f"the Falcon config has no {key!r}")
    return hf[key]


def _not_none(hf: Mapping[str, Any], key: str, default: Any) -> Any:
    value = hf.get(key, default)
    if value is None:
        raise FalconModelError(f"{key} is null in the Falcon config")
    return value


def _attention_layout(hf: Mapping[str, Any], new_arch: bool, heads: int) -> tuple[str, int]:
    """``(qkv_layout, num_kv_heads)`` as transformers' FalconAttention resolves them."""
    kv_heads = hf.get("num_kv_heads") or heads
    if new_arch:
        if not isinstance(kv_heads, int) or heads % kv_heads:
            raise FalconModelError(
                f"num_kv_heads ({kv_heads}) must divide num_attention_heads ({heads})"
            )
        return "grouped", kv_heads
    if hf.get("multi_query", True):
        return "multi_query", 1
    if kv_heads != heads:
        raise FalconModelError(
            f"num_kv_heads ({kv_heads}) != num_attention_heads ({heads}) needs "
            "new_decoder_architecture=True; plain multi-head attention cannot group KV heads"
        )
    return "per_head", heads


def _block(hf: Mapping[str, Any], new_arch: bool) -> str:
    """The decoder-layer wiring, as transformers' FalconDecoderLayer builds and runs it."""
    parallel = hf.get("parallel_attn", True)
    norms = hf.get("num_ln_in_parallel_attn")
    if new_arch:
        if not parallel:
            raise FalconModelError(
                "parallel_attn=False with new_decoder_architecture=True is not run by "
                "transformers' Falcon (it builds the wrong norms)"
            )
        norms = 2 if norms is None else norms
        if norms not in (1, 2):
            raise FalconModelError(f"num_ln_in_parallel_attn must be 1 or 2, got {norms!r}")
        return "parallel_two_norms" if norms == 2 else "parallel"
    if not parallel:
        return "sequential"
    if norms not in (None, 1):
        raise FalconModelError(
            f"num_ln_in_parallel_attn={norms!r} needs new_decoder_architecture=True "
            "(transformers builds ln_attn/ln_mlp but runs input_layernorm otherwise)"
        )
    return "parallel"


def _rope(hf: Mapping[str, Any]) -> tuple[float, float]:
    """``(rope_theta, linear_factor)`` from ``rope_parameters`` or the older ``rope_scaling``."""
    field = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    params = hf.get(field) or {}
    if not isinstance(params, Mapping):
        raise FalconModelError(f"{field} must be a mapping, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise FalconModelError(
            f"{field}: rope type {rope_type!r} is not supported (supported: {ROPE_TYPES})"
        )
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise FalconModelError(f"partial_rotary_factor={partial!r} is not supported for Falcon")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    factor = float(params.get("factor", 1.0)) if rope_type == "linear" else 1.0
    if not math.isfinite(theta) or not math.isfinite(factor):
        raise FalconModelError(f"{field}: rope_theta and factor must be finite")
    return theta, factor


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise FalconModelError(f"{name} must be a positive integer, got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise FalconModelError(f"{name} must be one of {choices}, got {value!r}")
