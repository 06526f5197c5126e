"""One Falcon decoder layer at the real Falcon-7B and Falcon-40B shapes, vs transformers.

Prints, side by side in one run, decode ms/token of ``llm_falcon_model`` (a part holding one
layer) and of ``transformers``' ``FalconDecoderLayer`` with its ``DynamicCache``, and the KV-cache
bytes per token each keeps. Both start from the same random float32 weights (assigned, not copied);
the part then packs them as ``load_part`` does (one copy), so peak memory is two copies of one
layer's weights plus caches (~5.5 GiB for the 40B layer).

Both decode the same tokens after the same prompt, interleaved token by token (the order
alternating), and the median and minimum per-token times are reported, because the machine is
small and shared. Usage: ``python bench/falcon_layer.py [--tokens 40] [--prompt 128]``.
"""

from __future__ import annotations

import argparse
import logging
import resource
import statistics
import time

import torch
import transformers
from transformers.cache_utils import DynamicCache
from transformers.models.falcon.modeling_falcon import FalconDecoderLayer, FalconRotaryEmbedding

from llm_falcon_model import FalconConfig, part_from_state_dict

log = logging.getLogger("falcon_layer")

SHAPES = {
    "Falcon-7B": dict(
        hidden_size=4544, num_attention_heads=71, multi_query=True, parallel_attn=True
    ),
    "Falcon-40B": dict(
        hidden_size=8192, num_attention_heads=128, num_kv_heads=8, new_decoder_architecture=True
    ),
}


def build(shape: dict, dtype: torch.dtype):
    """transformers' layer and our one-layer part, sharing one set of random weights."""
    hf_config = transformers.FalconConfig(vocab_size=1024, num_hidden_layers=1, **shape)
    hf_config._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf_layer = FalconDecoderLayer(hf_config, layer_idx=0)
    generator = torch.Generator().manual_seed(0)
    weights = {}
    for name, param in hf_layer.state_dict().items():
        scale = 1.0 if "ln" in name or "layernorm" in name else param.shape[-1] ** -0.5
        weights[name] = torch.randn(param.shape, generator=generator, dtype=dtype).mul_(scale)
    hf_layer.load_state_dict(weights, assign=True)
    config = FalconConfig.from_hf(hf_config.to_dict())
    part = part_from_state_dict(config, "0-1", {f"layers.0.{k}": v for k, v in weights.items()})
    part.pack()  # as load_part does: one copy, the CPU-friendly layouts
    rotary = FalconRotaryEmbedding(hf_config)
    return hf_layer.eval(), part.eval(), rotary, hf_config


def hf_stepper(layer, rotary, config):
    """A closure running transformers' layer on the next positions with its DynamicCache."""
    cache = DynamicCache(config=config)

    def forward(x: torch.Tensor) -> torch.Tensor:
        start = cache.get_seq_length()
        positions = torch.arange(start, start + x.shape[1])[None]
        emb = rotary(x, positions)
        return layer(x, alibi=None, attention_mask=None, position_ids=positions,
                     layer_past=cache, use_cache=True, position_embeddings=emb)[0]  # fmt: skip

    return forward, cache


def our_stepper(part, max_len: int):
    """The same for the part with its fixed-size cache."""
    cache = part.new_cache(1, max_len)
    return (lambda x: part(x, cache=cache)), cache


def timed(forward, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    began = time.perf_counter()
    out = forward(x)
    return time.perf_counter() - began, out


def hf_bytes_per_token(cache: DynamicCache) -> int:
    """Bytes transformers' DynamicCache holds per cached token."""
    layer = cache.layers[0]
    return (layer.keys.nbytes + layer.values.nbytes) // layer.keys.shape[-2]


def bench(name: str, shape: dict, tokens: int, prompt_len: int) -> None:
    dtype = torch.float32
    hf_layer, part, rotary, hf_config = build(shape, dtype)
    config = part.config
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randn(1, prompt_len, config.hidden_size, generator=generator, dtype=dtype)
    steps = torch.randn(1, tokens, config.hidden_size, generator=generator, dtype=dtype)
    hf_times, our_times = [], []
    with torch.inference_mode():
        hf_forward, hf_cache = hf_stepper(hf_layer, rotary, hf_config)
        our_forward, our_cache = our_stepper(part, prompt_len + tokens)
        hf_forward(prompt), our_forward(prompt)  # prefill, not timed
        for i in range(tokens):  # decode, one token each in turn, order alternating
            x = steps[:, i : i + 1]
            if i % 2:
                (our_s, our_out), (hf_s, hf_out) = timed(our_forward, x), timed(hf_forward, x)
            else:
                (hf_s, hf_out), (our_s, our_out) = timed(hf_forward, x), timed(our_forward, x)
            hf_times.append(hf_s)
            our_times.append(our_s)
    hf_ms, our_ms = statistics.median(hf_times) * 1e3, statistics.median(our_times) * 1e3
    hf_min, our_min = min(hf_times) * 1e3, min(our_times) * 1e3
    hf_kv, our_kv = hf_bytes_per_token(hf_cache), our_cache.bytes_per_token()
    formula = config.kv_bytes_per_token(dtype.itemsize, num_layers=1)
    diff = (hf_out - our_out).abs().max().item()
    print(f"{name:<11} float32 decode ms/token  transformers {hf_ms:6.1f} ({hf_min:5.1f})   "
          f"llm_falcon_model {our_ms:6.1f} ({our_min:5.1f})   "
          f"speedup x{hf_ms / our_ms:4.2f} (x{hf_min / our_min:4.2f})")  # fmt: skip
    print(f"{'':<11} KV bytes/token/layer     transformers {hf_kv:8d}   "
          f"llm_falcon_model {our_kv:8d}   (2 x 1 x {config.num_kv_heads} kv heads x "
          f"{config.head_dim} x 4 = {formula}; "
          f"transformers/ours x{hf_kv / our_kv:.0f})")  # fmt: skip
    print(f"{'':<11} max |difference| of the last output: {diff:.2e}")
    del hf_layer, part


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=40, help="decode steps timed per side")
    parser.add_argument("--prompt", type=int, default=128, help="prefilled tokens before decoding")
    parser.add_argument("--only", choices=list(SHAPES), help="run one shape")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads; {args.tokens} decode steps per side, interleaved "
          f"token by token, after a {args.prompt}-token prompt; median (min) ms/token")  # fmt: skip
    for name, shape in SHAPES.items():
        if args.only in (None, name):
            bench(name, shape, args.tokens, args.prompt)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak resident memory {peak:.2f} GiB")


if __name__ == "__main__":
    main()
