"""Falcon float32 decode and prefill on a CPU: llm_falcon_model vs transformers, side by side.

Two models with random weights, built from config objects (no download): a Falcon-7B-shaped
model cut to a few layers (hidden 4544, 71 query heads sharing one KV head, vocabulary 65024)
and a tiny full model. For each, at batch 1 and 8 and on each thread count asked for, one run
interleaves, round by round, transformers' ``FalconForCausalLM`` (SDPA attention, its own KV
cache), the part as ``load_part`` gives it (packed weights: the default) and the unpacked part;
each round prefills a random prompt and times greedy decode steps. Our parts share the model's
weight tensors (``part_from_state_dict``; packing copies them once). Medians are printed, then
every ratio against transformers measured in that same run: decode tokens/s and prefill tokens/s.

Usage: ``python bench/falcon_decode.py [--layers 2] [--threads 1 2] [--rounds 5] [--steps 16]
[--torch-products]``. ``--torch-products`` adds the packed part with every product on torch's own
kernels (what a torch without oneDNN's linear runs). The load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

from llm_falcon_model import FalconConfig, part_from_state_dict

sys.path.insert(0, str(Path(__file__).parent))
from llama_decode import Ours, Theirs, both_off, load, without_kernel  # noqa: E402  (the same runners, family-agnostic)

FALCON_7B = dict(
    vocab_size=65024, hidden_size=4544, num_attention_heads=71, multi_query=True,
    parallel_attn=True, new_decoder_architecture=False, bias=False,
)  # fmt: skip
TINY = dict(
    vocab_size=1024, hidden_size=256, num_attention_heads=8, num_hidden_layers=4,
    new_decoder_architecture=True, num_kv_heads=2, bias=False,
)  # fmt: skip


def build(options: dict):
    """transformers' model (random weights, eval, SDPA) and our packed and unpacked full parts
    sharing its tensors."""
    torch.manual_seed(0)
    config = transformers.FalconConfig(**options)
    config._attn_implementation = "sdpa"
    model = transformers.FalconForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ln" not in name and "layernorm" not in name:
                param.normal_(std=param.shape[-1] ** -0.5)
    state = {k.removeprefix("transformer.").replace("h.", "layers.", 1): v
             for k, v in model.state_dict().items()}  # fmt: skip
    ours = FalconConfig.from_hf(config.to_dict())
    if ours.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        state["lm_head.weight"] = state["word_embeddings.weight"]
    unpacked = part_from_state_dict(ours, "f", state)
    packed = part_from_state_dict(ours, "f", state).pack()
    return model, packed, unpacked


def one_round(runners, ids: torch.Tensor, steps: int, order: int, results: dict) -> dict:
    """Each runner prefills ``ids`` and decodes ``steps`` tokens; returns their tokens."""
    tokens = {}
    for runner in runners[::-1] if order % 2 else runners:
        start = time.perf_counter()
        token = runner.prefill(ids, steps)
        prefill = time.perf_counter() - start
        out, spent = [token], []
        for _ in range(steps):
            start = time.perf_counter()
            token = runner.decode(token)
            spent.append(time.perf_counter() - start)
            out.append(token)
        entry = results.setdefault(runner.name, ([], []))
        entry[0].append(prefill)
        entry[1].append(statistics.median(spent))
        tokens[runner.name] = torch.cat(out, 1)
    return tokens


def measure(model_name: str, runners, vocab: int, args, threads: int) -> list[str]:
    torch.set_num_threads(threads)
    lines = []
    gen = torch.Generator().manual_seed(0)
    for batch in (1, 8):
        ids = torch.randint(0, vocab, (batch, args.prompt_len), generator=gen)
        results: dict = {}
        with torch.inference_mode():
            one_round(runners, ids, 2, 0, {})  # warm-up, not counted
            for round_ in range(args.rounds):
                tokens = one_round(runners, ids, args.steps, round_, results)
        same = all(torch.equal(t, tokens["transformers"]) for t in tokens.values())
        med = {n: (statistics.median(p), statistics.median(d)) for n, (p, d) in results.items()}
        hf_pre, hf_dec = med["transformers"]
        for name, (pre, dec) in med.items():
            print(f"{model_name:<14}{threads:>3} thr  batch {batch}  {name:<32} decode "
                  f"{dec * 1e3:8.2f} ms/step {batch / dec:8.1f} tok/s   prefill "
                  f"{batch * args.prompt_len / pre:8.0f} tok/s")  # fmt: skip
        print(f"({load()})")
        for name, (pre, dec) in med.items():
            if name != "transformers":
                lines.append(f"{model_name:<14}{threads} thread(s) batch {batch}: {name:<32} "
                             f"decode {hf_dec / dec:.2f}x transformers' tokens/s, prefill "
                             f"{hf_pre / pre:.2f}x  (greedy tokens equal: {same})")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="layers of the 7B-shaped model")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--only", choices=["7b", "tiny"], help="run one model")
    parser.add_argument(
        "--torch-products", action="store_true", help="add the packed part on torch's products"
    )
    parser.add_argument(
        "--without-kernel", action="store_true",
        help="add the packed part with llm_slice_core's decode kernel switched off",
    )  # fmt: skip
    args = parser.parse_args()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, float32, prompt "
          f"{args.prompt_len} tokens, {args.steps} decode steps, {args.rounds} interleaved "
          f"rounds, medians; {load()}")  # fmt: skip
    models = {
        "7b": (f"7B-shape x{args.layers}", dict(FALCON_7B, num_hidden_layers=args.layers)),
        "tiny": ("tiny full", TINY),
    }
    summary = []
    for key, (name, options) in models.items():
        if args.only not in (None, key):
            continue
        model, packed, unpacked = build(options)
        runners = [Theirs(model), Ours(packed, "llm_falcon_model"),
                   Ours(unpacked, "llm_falcon_model unpacked")]  # fmt: skip
        if args.torch_products:
            runners.append(Ours(packed, "llm_falcon_model torch products", both_off))
        if args.without_kernel:
            runners.append(Ours(packed, "llm_falcon_model without kernel", without_kernel))
        for threads in args.threads:
            summary += measure(name, runners, options["vocab_size"], args, threads)
        del model, packed, unpacked, runners
    print()
    print("\n".join(summary))


if __name__ == "__main__":
    main()
