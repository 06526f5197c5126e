"""Layer streaming on a CUDA device: a model several times the device memory allowed to it.

A random Llama (default: 16 layers of Llama-3-8B's shapes, bfloat16, ~7 GB of layers) is written
as sepweight; the streamed part keeps K layers on the device (K = 2 and 4: a cap of 1/8 and 1/4
of the layers). Prints decode ms/token at batch 1 against the host-to-device copy floor (layer
bytes / the measured pinned copy bandwidth), the streamer's stats (share of the load hidden,
GB/s of the host copy and of the device copy), and the resident model's ms/token when it fits.
Target: streamed within 1.1x of the floor.

    .venv/bin/python bench/streaming_cuda.py [--layers 16] [--hidden 4096] [--steps 8] [--dir D]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

# this folder holds bench/socket_rpc.py: keep it from shadowing the socket_rpc package
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from llm_partial_run.streaming import load_streamed  # noqa: E402
from llm_sepweight import dump, find_architecture  # noqa: E402


def config(layers: int, hidden: int) -> dict:
    """A Llama-3-style config dict (Hugging Face names) of ``layers`` layers."""
    return dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=32000,
        hidden_size=hidden, intermediate_size=hidden * 7 // 2, num_hidden_layers=layers,
        num_attention_heads=hidden // 128, num_key_value_heads=max(1, hidden // 512),
        rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
        tie_word_embeddings=False, hidden_act="silu", torch_dtype="bfloat16",
    )  # fmt: skip


def random_tensors(cfg: dict):
    """(name, tensor) of a random model in checkpoint order, one layer at a time (small RAM)."""
    h, inner, hd = cfg["hidden_size"], cfg["intermediate_size"], 128
    kv = cfg["num_key_value_heads"] * hd
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    yield "model.embed_tokens.weight", rand(cfg["vocab_size"], h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h),
                  "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, h),
                  "mlp.gate_proj": (inner, h), "mlp.up_proj": (inner, h),
                  "mlp.down_proj": (h, inner)}  # fmt: skip
        for name, shape in shapes.items():
            yield f"{p}{name}.weight", rand(*shape)
        yield f"{p}input_layernorm.weight", torch.ones(h, dtype=torch.bfloat16)
        yield f"{p}post_attention_layernorm.weight", torch.ones(h, dtype=torch.bfloat16)
    yield "model.norm.weight", torch.ones(h, dtype=torch.bfloat16)
    yield "lm_head.weight", rand(cfg["vocab_size"], h)


def pinned_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of the best host (pinned) -> device copy of ``gib`` GiB."""
    host = torch.empty(int(gib * 2**30), dtype=torch.uint8, pin_memory=True)
    dev = torch.empty_like(host, device="cuda")
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return host.numel() / best


def decode_ms(part, steps: int) -> float:
    """Median ms of a batch-1 decode step (synchronised, token read back)."""
    cache = part.new_cache(1, steps + 16)
    part(torch.arange(1, 9, device="cuda")[None], None, cache)
    token = torch.tensor([[5]], device="cuda")
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        logits = part(token, None, cache)
        token = logits[:, -1:].argmax(-1)
        token.item()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or Path(tmp)
        directory = root / f"random-llama-{args.layers}x{args.hidden}"
        cfg = config(args.layers, args.hidden)
        if not (directory / "manifest.json").exists():
            decider = find_architecture(name="llama").decider(cfg)
            dump(random_tensors(cfg), directory, decider, arch="llama", config=cfg)
        run(directory, args)


def run(directory: Path, args) -> None:
    bandwidth = pinned_bandwidth()
    print(f"{torch.cuda.get_device_name()}: pinned host->device {bandwidth / 1e9:.1f} GB/s")
    results = {}
    layer_bytes = 0
    for k in (2, 4):
        with load_streamed(directory, resident_layers=k, device="cuda") as part:
            layer_bytes = sum(part.layer_bytes())
            decode_ms(part, 2)  # warm-up
            part.stats.reset()
            results[k] = decode_ms(part, args.steps)
            s = part.stats
            print(f"K={k}: {results[k]:8.1f} ms/token; hidden {100 * s.hidden_fraction:.0f}%, "
                  f"map {s.gb_per_s('map'):.1f} GB/s, host copy {s.gb_per_s('host_copy'):.1f} "
                  f"GB/s, to device {s.gb_per_s('to_device'):.1f} GB/s")  # fmt: skip
    floor = layer_bytes / bandwidth * 1000
    print(f"layers {layer_bytes / 1e9:.2f} GB; floor {floor:.1f} ms/token")
    for k, ms in results.items():
        print(f"  K={k} streamed / floor: {ms / floor:.2f}x (target <= 1.1x)")
    free, _ = torch.cuda.mem_get_info()
    if layer_bytes * 1.3 < free:
        arch = find_architecture(name="llama")
        part = arch.load_part(directory, "f", device="cuda")
        print(f"resident: {decode_ms(part, args.steps):.1f} ms/token")


if __name__ == "__main__":
    main()
