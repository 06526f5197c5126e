"""Run every benchmark in bench/ and write one markdown table of the ratios they print.

    python bench/run_all.py [--quick] [--only NAME,...] [--skip NAME,...] [--out FILE]

Each ``bench/NAME.py`` runs as a subprocess, one after another (they measure side by side
within their own run; running two at once would only measure the contention). ``--quick``
passes each bench its short options (fewer rounds and tokens: a check that every bench runs and
a rough figure, not a measurement to quote). The benches that use SmolLM2 get one copy converted
once (the demo's cache directory, ``--cache-dir``). A bench that needs CUDA is skipped, with the
reason in the table, where torch finds no CUDA device. A bench added to the folder later runs
too, with no options.

Every line of a bench's output that states a ratio (``1.52x``) becomes a row of the table, next
to the bench's name, as printed; the table starts with the machine, the versions and the date,
so figures taken from it can say where and when they were measured. ``--logs DIR`` keeps each
bench's whole output.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# bench/socket_rpc.py would shadow the socket_rpc package: drop this folder from the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

# Short options per bench for --quick (names are the files' stems).
QUICK: dict[str, list[str]] = {
    "api": ["--tokens", "8", "--rounds", "1"],
    "falcon_decode": ["--only", "tiny", "--rounds", "1", "--steps", "4", "--threads", "1"],
    "falcon_layer": ["--only", "Falcon-7B", "--tokens", "4", "--prompt", "16"],
    "llama_decode": ["--rounds", "1", "--steps", "4", "--no-compile"],
    "llama_decode_cuda": ["--rounds", "1", "--steps", "4"],
    "pipeline": ["--tokens", "8", "--rounds", "1"],
    "pipeline_dist": ["--tokens", "8", "--rounds", "1"],
    "products": ["--rounds", "1", "--megabytes", "100", "--threads", "1"],
    "sampler": ["--repeats", "3", "--steps", "16"],
    "socket_rpc": ["--rounds", "2"],
}
# Options every run of a bench gets: pipeline.py's torch.distributed lines are pipeline_dist.py,
# which run_all runs on its own.
ALWAYS: dict[str, list[str]] = {"pipeline": ["--no-dist"]}
# The option through which a bench takes an already converted SmolLM2 directory.
SMOLLM2_OPTION = {"api": "--dir", "llama_decode": "--sepweight", "pipeline": "--dir",
                  "pipeline_dist": "--dir"}  # fmt: skip
NEEDS_CUDA = {"llama_decode_cuda"}
TARGET = re.compile(r"\(?target[^)]*\)?")
RATIO = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)x\b")


def benches() -> list[str]:
    """The stems of bench/*.py, this script left out."""
    return sorted(p.stem for p in HERE.glob("*.py") if p.name != Path(__file__).name)


def machine() -> str:
    """CPU model and cores, GPU, Python and torch versions: where the figures come from."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    return (f"{cpu}, {os.cpu_count()} logical cores; {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}; {platform.system()} {platform.release()}")  # fmt: skip


def smollm2_dir(cache_dir: Path) -> Path:
    """SmolLM2 as float32 sepweight under ``cache_dir`` (converted once, then up to date)."""
    from llm_partial_run.commands.demo import converted_model

    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the table
        return converted_model(cache_dir)


def run_bench(name: str, args: list[str], timeout: float) -> tuple[str, float, str]:
    """Run one bench; returns (status, seconds, its output: stdout then stderr)."""
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, str(HERE / f"{name}.py"), *args], cwd=HERE.parent,
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        return f"timed out after {timeout:.0f} s", time.perf_counter() - start, out
    seconds = time.perf_counter() - start
    output = done.stdout + ("\n" + done.stderr if done.stderr else "")
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return f"failed (exit {done.returncode}): {last}", seconds, output
    return "ok", seconds, output


def ratio_rows(name: str, output: str) -> list[tuple[str, str, str]]:
    """(bench, line, ratios) for every line of ``output`` that states a ratio. A line that starts
    with a number (a row of a printed table) is prefixed with the two lines above its table."""
    rows, context = [], []
    for line in output.splitlines():
        text = " ".join(line.split())
        found = RATIO.findall(TARGET.sub("", line))  # a target's ratio is not a measurement
        if not found:
            if text:
                context = [*context, text][-2:]
            continue
        if text[:1].isdigit() and context:
            text = f"{' / '.join(context)}: {text}"
        text = text.replace("|", "\\|")
        rows.append((name, f"`{text}`", ", ".join(f"{r}x" for r in found)))
    return rows


def table(results: list[tuple[str, str, float, str]], header: str) -> str:
    """The markdown: the header, a status line per bench, then the ratio rows."""
    lines = [header, "", "| bench | status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {status} | {seconds:.0f} |" for name, status, seconds, _ in results]
    lines += ["", "| bench | line as printed | ratios |", "|---|---|---|"]
    for name, status, _, output in results:
        if status == "ok":
            lines += [" | ".join(("", *row, "")).strip() for row in ratio_rows(name, output)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short options for every bench")
    parser.add_argument("--only", help="these benches, comma-separated")
    parser.add_argument("--skip", help="leave out these benches, comma-separated")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    parser.add_argument("--logs", type=Path, help="keep each bench's output in DIR/NAME.log")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per bench")
    parser.add_argument("--cache-dir", type=Path, help="where SmolLM2 is converted (default: "
                        "the demo's cache directory)")  # fmt: skip
    args = parser.parse_args()

    import torch

    from llm_partial_run.commands.demo import default_cache_dir

    names = benches()
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            parser.error(f"no bench named {', '.join(unknown)} (there are: {', '.join(names)})")
        names = [n for n in names if n in wanted]
    if args.skip:
        names = [n for n in names if n not in {s.strip() for s in args.skip.split(",")}]
    model = None
    if any(n in SMOLLM2_OPTION for n in names):
        model = smollm2_dir(args.cache_dir or default_cache_dir())
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)

    results = []
    for name in names:
        if name in NEEDS_CUDA and not torch.cuda.is_available():
            results.append((name, "skipped: needs a CUDA device", 0.0, ""))
            continue
        bench_args = ALWAYS.get(name, []) + (QUICK.get(name, []) if args.quick else [])
        if model is not None and name in SMOLLM2_OPTION:
            bench_args += [SMOLLM2_OPTION[name], str(model)]
        print(f"running bench/{name}.py {' '.join(bench_args)}", file=sys.stderr, flush=True)
        status, seconds, output = run_bench(name, bench_args, args.timeout)
        print(f"  {status} in {seconds:.0f} s", file=sys.stderr, flush=True)
        if args.logs:
            (args.logs / f"{name}.log").write_text(output)
        results.append((name, status, seconds, output))

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (f"# bench/run_all.py{' --quick' if args.quick else ''}, {now}\n\n"
              f"Machine: {machine()}")  # fmt: skip
    text = table(results, header)
    sys.stdout.write(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
