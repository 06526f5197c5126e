"""Where Llama checkpoint tensors go in a sepweight directory, from Hugging Face or GGUF names.

``ARCHITECTURE`` is registered under the entry-point group ``llm_microlibs.models`` so that
``llm_sepweight.convert`` finds it by ``model_type`` (HF) or ``general.architecture`` (GGUF).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from llm_sepweight import Architecture, Decider, Placement

from .config import LlamaConfig
from .errors import LlamaModelError
from .loading import load_part

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_LAYER_KEYS = {
    f"{module}.{kind}"
    for module in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
    for kind in ("weight", "bias")
} | {"input_layernorm.weight", "post_attention_layernorm.weight"}


def decider(hf_config: Mapping[str, Any]) -> Decider:
    """The decider for Hugging Face Llama names (``model.layers.3.mlp.up_proj.weight`` ...).

    With tied embeddings the embedding matrix is stored twice, as begin ``embed_tokens.weight``
    and end ``lm_head.weight``, so an end-only part needs no begin file; a checkpoint's own
    ``lm_head.weight`` is then skipped. Rotary ``inv_freq`` buffers are skipped; any other unknown
    key is an error.
    """
    tied = LlamaConfig.from_hf(hf_config).tie_word_embeddings

    def decide(key: str) -> Placement | list[Placement] | None:
        if key == "model.embed_tokens.weight":
            begin = ("begin", "embed_tokens.weight")
            return [begin, ("end", "lm_head.weight")] if tied else begin
        if key == "lm_head.weight":
            return None if tied else ("end", "lm_head.weight")
        if key == "model.norm.weight":
            return ("end", "norm.weight")
        if key.endswith("rotary_emb.inv_freq"):
            return None
        match = _LAYER.fullmatch(key)
        if match and match[2] in _LAYER_KEYS:
            return ("mid", int(match[1]), match[2])
        raise LlamaModelError(f"unexpected tensor {key!r} in a Llama checkpoint")

    return decide


_GGUF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def gguf_rename(name: str) -> str | None:
    """llama.cpp tensor name -> Hugging Face name; None for tensors HF does not keep."""
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    if name == "rope_freqs.weight" or name.endswith("attn_rot_embd.weight"):
        return None
    match = _GGUF_BLOCK.fullmatch(name)
    if match is None or match[2] not in _GGUF_LAYER:
        raise LlamaModelError(f"unexpected tensor {name!r} in a llama GGUF file")
    return f"model.layers.{match[1]}.{_GGUF_LAYER[match[2]]}.{match[3]}"


def gguf_transform(
    hf_name: str, tensor: torch.Tensor, hf_config: Mapping[str, Any]
) -> torch.Tensor:
    """Undo llama.cpp's row permutation of q_proj / k_proj (weights and biases).

    llama.cpp stores each head's rows interleaved (rotary pairs 2i, 2i+1 adjacent, the GPT-J
    layout) where HF keeps them as two halves (i, i + head_dim/2); this moves them back.
    """
    config = LlamaConfig.from_hf(hf_config)
    if hf_name.endswith("self_attn.q_proj.weight") or hf_name.endswith("self_attn.q_proj.bias"):
        return unpermute_rows(tensor, config.num_attention_heads)
    if hf_name.endswith("self_attn.k_proj.weight") or hf_name.endswith("self_attn.k_proj.bias"):
        return unpermute_rows(tensor, config.num_key_value_heads)
    return tensor


def unpermute_rows(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from the interleaved order (pairs) to the half-split order."""
    rows = tensor.shape[0]
    if rows % (2 * heads):
        raise LlamaModelError(f"cannot unpermute {rows} rows for {heads} heads")
    paired = tensor.reshape(heads, rows // heads // 2, 2, *tensor.shape[1:])  # [h, d/2, 2, ...]
    return paired.transpose(1, 2).reshape(tensor.shape).contiguous()


def config_from_gguf(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """GGUF metadata (``llama.*`` keys) -> a Hugging Face Llama config dict.

    llama.cpp omits ``output.weight`` for tied models, so the head is tied exactly when
    ``sepweight.tensor_names`` (passed by ``llm_sepweight.convert``) lacks it; without that list
    the head is assumed tied. ``sepweight.vocab_size`` (the tokenizer's token count) stands in
    for a missing ``llama.vocab_size``.
    """
    arch = metadata.get("general.architecture", "llama")

    def get(key: str, default: Any = None) -> Any:
        value = metadata.get(f"{arch}.{key}", default)
        if value is None:
            raise LlamaModelError(f"GGUF metadata has no {arch}.{key}")
        return value

    names = metadata.get("sepweight.tensor_names")
    tied = names is None or "output.weight" not in names

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(get("vocab_size", metadata.get("sepweight.vocab_size"))),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length", get("rope.dimension_count", hidden // heads))),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "tie_word_embeddings": tied,
    }
    scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {
            "rope_type": "linear",
            "factor": float(get("rope.scaling.factor")),
        }
    elif scaling != "none":
        raise LlamaModelError(f"GGUF {arch}.rope.scaling.type {scaling!r} is not supported")
    return config


ARCHITECTURE = Architecture(
    name="llama",
    model_types=("llama", "mistral"),
    decider=decider,
    gguf_architectures=("llama",),
    config_from_gguf=config_from_gguf,
    gguf_rename=gguf_rename,
    gguf_transform=gguf_transform,
    load_part=load_part,
)
