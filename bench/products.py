"""The decode products alone: llm_slice_core's kernel vs oneDNN vs torch.mm, weights from DRAM.

    python bench/products.py [--threads 1 2] [--rows 1 2 4 8 16] [--rounds 5]

For each weight shape of SmolLM2-135M and Falcon-7B (a packed ``[in, out]`` float32 matrix, as
``Linears.pack`` stores it), enough distinct copies to fill ~300 MB are made, so every product
reads its weight from main memory (a decode step reads each weight once; one weight reused
would sit in the cache and hide the memory's speed). Each product is then run on every copy in
turn, for each row count, by the three paths side by side in one run: the decode kernel
(``llm_slice_core.kernel.product``), oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``)
and ``torch.mm``. Printed: the weight bytes read per second (best of ``--rounds``) and the
kernel's speed over the faster of the other two. The load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# bench/ holds files named like packages: drop this folder from the path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import torch  # noqa: E402

from llm_slice_core import kernel  # noqa: E402

SHAPES = {  # name: (in, out)
    "SmolLM2 qkv": (576, 960),
    "SmolLM2 gate+up": (576, 3072),
    "SmolLM2 down": (1536, 576),
    "SmolLM2 head": (576, 49152),
    "Falcon-7B qkv": (4544, 4672),
    "Falcon-7B 4h_to_h": (18176, 4544),
    "Falcon-7B head": (4544, 65024),
}


def onednn(x: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """oneDNN's linear on the packed weight's own memory (as llm_slice_core.products runs it)."""
    return torch.ops.mkldnn._linear_pointwise.default(x, w_t.t(), None, "none", [], "")


def best_rate(fn, x: torch.Tensor, weights: list[torch.Tensor], rounds: int) -> float:
    """Weight bytes read per second, best round: ``fn(x, w)`` over every copy in turn."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for w in weights:
            fn(x, w)
        best = min(best, time.perf_counter() - start)
    return sum(w.nbytes for w in weights) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--megabytes", type=int, default=300, help="weight copies per shape")
    args = parser.parse_args()
    if not kernel.available():
        raise SystemExit("the decode kernel could not be built here (no C++ compiler?)")
    paths = {"kernel": kernel.product, "oneDNN": onednn, "torch.mm": torch.mm}
    print(f"torch {torch.__version__}, float32, weights from DRAM (~{args.megabytes} MB of copies "
          f"per shape), best of {args.rounds}; GB/s of weight read; load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    for name, (inputs, outputs) in SHAPES.items():
        copies = max(2, args.megabytes * 10**6 // (inputs * outputs * 4))
        weights = [torch.randn(inputs, outputs, generator=gen) for _ in range(copies)]
        for threads in args.threads:
            torch.set_num_threads(threads)
            cells = []
            for rows in args.rows:
                x = torch.randn(rows, inputs, generator=gen)
                rates = {p: best_rate(fn, x, weights, args.rounds) for p, fn in paths.items()}
                other = max(rates["oneDNN"], rates["torch.mm"])
                cells.append(f"{rows} rows: " + " / ".join(f"{r / 1e9:.1f}" for r in rates.values())
                             + f" ({rates['kernel'] / other:.2f}x)")  # fmt: skip
            print(f"{name:18s} [{inputs}, {outputs}] {threads} thr, kernel / oneDNN / torch.mm: "
                  + "; ".join(cells), flush=True)  # fmt: skip
        del weights


if __name__ == "__main__":
    main()
