"""SmolLM2-135M on a CUDA device: llm_llama_model against transformers, side by side.

The GPU counterpart of ``bench/llama_decode.py`` (same runners, same interleaved rounds and
medians), on a model of SmolLM2-135M's exact shapes with random weights (a GPU machine need not
carry the 93 MB model package; speed does not depend on the values): prefill tokens/s and decode
ms/step at batch 1 and 8, in float32 and bfloat16, each step timed to the device's synchronize;
and the memory-bandwidth floor of a decode step (weight bytes / the device's measured read
bandwidth). A 135M model is far too small to fill a data-centre GPU, so both sides are bound by
kernel launches, not by memory: the floor shows how far from it launch overhead leaves them.

    .venv/bin/python bench/llama_decode_cuda.py [--rounds 5] [--dtypes float32,bfloat16]

``--device cpu`` runs the same script on the CPU (a quick check of the script itself).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from llama_decode import SMOLLM2, Ours, Theirs, measure, run_round, sync, weight_bytes  # noqa: E402


def device_bandwidth(device: str, gib: float = 4.0, repeats: int = 10) -> float:
    """Bytes/s reading a large tensor on ``device`` (median of ``sum`` over it)."""
    big = torch.ones(int(gib * 2**30) // 4, device=device)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        big.sum()
        sync(device)
        times.append(time.perf_counter() - start)
    return big.nbytes / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (bench/llama_decode.py is the CPU benchmark)")

    import transformers

    from llm_llama_model import load_part
    from llm_sepweight import convert

    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"{where}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, prompt {args.prompt_len} tokens, {args.steps} decode "
          f"steps, {args.rounds} interleaved rounds, medians")  # fmt: skip
    bandwidth = device_bandwidth(device, gib=4.0 if device == "cuda" else 0.5)
    print(f"device read bandwidth (sum over a large tensor): {bandwidth / 1e12:.2f} TB/s")
    gen = torch.Generator().manual_seed(0)
    prompts = {
        b: torch.randint(0, 49152, (b, args.prompt_len), generator=gen).to(device) for b in (1, 8)
    }
    with tempfile.TemporaryDirectory(prefix="smollm2-") as tmp:
        directory = Path(tmp) / "sepweight"
        checkpoint = Path(tmp) / "hf"
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2)).save_pretrained(
            checkpoint
        )
        convert(checkpoint, directory, dtype="float32")
        for name in args.dtypes.split(","):
            dtype = getattr(torch, name)
            start = time.perf_counter()
            part = load_part(directory, "f", device=device, dtype=dtype)
            sync(device)
            loaded = time.perf_counter() - start
            model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype)
            model = model.eval().to(device)
            floor_ms = weight_bytes(part) / bandwidth * 1e3
            nbytes = weight_bytes(part)
            print(f"\n{name}: load_part to {device} {loaded:.2f} s; weights {nbytes / 1e6:.0f} "
                  f"MB, floor {floor_ms:.3f} ms per decode step")  # fmt: skip
            runners = [Ours(part), Theirs(model)]
            results: dict = {}
            with torch.inference_mode():
                for ids in prompts.values():  # warm-up: kernels chosen, caches allocated
                    for runner in runners:
                        measure(runner, ids, 4)
                for round_ in range(args.rounds):
                    by_batch = run_round(runners, prompts, round_, args.steps, results)
                    for batch, tokens in by_batch.items():
                        if round_ == 0:
                            agree = sum(a == b for a, b in zip(*tokens.values(), strict=True))
                            print(f"batch {batch}: row 0 greedy tokens agreeing: "
                                  f"{agree}/{args.steps + 1}")  # fmt: skip
            for batch in prompts:
                ours = results["llm_llama_model", batch]
                theirs = results["transformers", batch]
                pre, dec = (statistics.median(r[i] for r in ours) for i in (0, 1))
                hpre, hdec = (statistics.median(r[i] for r in theirs) for i in (0, 1))
                print(f"{name} batch {batch}: decode {dec * 1e3:.2f} ms/step (transformers "
                      f"{hdec * 1e3:.2f}) = {hdec / dec:.2f}x tokens/s; prefill "
                      f"{batch * args.prompt_len / pre:.0f} tok/s (transformers "
                      f"{batch * args.prompt_len / hpre:.0f}) = {hpre / pre:.2f}x; "
                      f"decode step / floor {dec * 1e3 / floor_ms:.1f}")  # fmt: skip
            del part, model
            if device == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
