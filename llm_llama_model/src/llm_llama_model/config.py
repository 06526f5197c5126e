"""Frozen, validated configuration of a Llama-family model, built from a Hugging Face config."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import LlamaModelError

_MODEL_TYPES = ("llama", "mistral")
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: ``linear`` (positions / factor) or ``llama3`` (Llama 3.1)."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class LlamaConfig:
    """What a Llama-family part needs to know about the model; batch and length are not here.

    Covers multi-head, grouped-query and multi-query attention (``num_key_value_heads`` equal to,
    a divisor of, or 1 against ``num_attention_heads``), tied embeddings, an explicit ``head_dim``,
    biases, RoPE scaling and Mistral's sliding window.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LlamaModelError(
                    f"config field {name!r} must be a positive int, got {value!r}"
                )
        if self.num_attention_heads % self.num_key_value_heads:
            raise LlamaModelError(
                f"config field 'num_key_value_heads' ({self.num_key_value_heads}) must divide "
                f"'num_attention_heads' ({self.num_attention_heads})"
            )
        if self.head_dim % 2:
            raise LlamaModelError(
                f"config field 'head_dim' must be even for RoPE, got {self.head_dim}"
            )
        if not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            raise LlamaModelError("config fields 'rms_norm_eps' and 'rope_theta' must be > 0")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise LlamaModelError(
                f"config field 'sliding_window' must be >= 1 or null, got {self.sliding_window}"
            )

    @property
    def kv_groups(self) -> int:
        """How many query heads share one key/value head (1 = MHA, num_attention_heads = MQA)."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf(cls, source: Mapping[str, Any] | str | Path) -> LlamaConfig:
        """Build from a Hugging Face ``config.json``: a dict, the file, or the folder holding it.

        Raises LlamaModelError naming the field for anything this package cannot run
        (unknown ``model_type``, rope type, activation, partial rotary embeddings, ...).
        """
        hf = _read_config(source)
        model_type = hf.get("model_type", "llama")
        if model_type not in _MODEL_TYPES:
            raise LlamaModelError(
                f"config field 'model_type' is {model_type!r}; "
                f"llm_llama_model runs {', '.join(_MODEL_TYPES)}"
            )
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise LlamaModelError(f"config field 'hidden_act' is {act!r}; only 'silu' is supported")
        try:
            hidden = int(hf["hidden_size"])
            heads = int(hf["num_attention_heads"])
            rope_theta, scaling = _rope(hf)
            return cls(
                vocab_size=hf["vocab_size"],
                hidden_size=hidden,
                intermediate_size=hf["intermediate_size"],
                num_hidden_layers=hf["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=hf.get("num_key_value_heads") or heads,
                head_dim=hf.get("head_dim") or hidden // heads,
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=scaling,
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                attention_bias=bool(hf.get("attention_bias", False)),
                mlp_bias=bool(hf.get("mlp_bias", False)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                sliding_window=_sliding_window(hf, model_type),
            )
        except KeyError as missing:
            raise LlamaModelError(f"config is missing the required field {missing}") from None


def _read_config(source: Mapping[str, Any] | str | Path) -> Mapping[str, Any]:
    if isinstance(source, Mapping):
        return source
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise LlamaModelError(f"cannot read a Hugging Face config from {path}: {err}") from err


def _sliding_window(hf: Mapping[str, Any], model_type: str) -> int | None:
    # transformers' MistralConfig defaults to a 4096 window when the field is absent.
    default = 4096 if model_type == "mistral" else None
    return hf.get("sliding_window", default)


def _rope(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from the old ``rope_theta``/``rope_scaling`` or the new
    ``rope_parameters`` layout of transformers 5."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise LlamaModelError("config field 'partial_rotary_factor' must be 1.0")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise LlamaModelError(
            f"config field 'rope_scaling.rope_type' is {rope_type!r}; "
            f"supported: {', '.join(_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, None
    if "factor" not in params:
        raise LlamaModelError(f"config field 'rope_scaling.factor' is required for {rope_type!r}")
    if rope_type == "linear":
        return theta, RopeScaling("linear", float(params["factor"]))
    return theta, RopeScaling(
        "llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", hf.get("max_position_embeddings", 8192))
        ),
    )
