"""The decode product kernel: ``x [M, K] @ w_t [K, N] (+ bias)`` for a few float32 rows on a CPU.

A decode step reads every weight once for a handful of input rows, so its speed is the speed
at which the products stream weights from memory. torch's own product reads a packed
``[in, out]`` weight at the memory's speed for one row but at a quarter of it for 4-8 rows,
oneDNN's at about half for any row count (measured on SmolLM2 and Falcon-7B shapes, weights
coming from DRAM). ``_kernel.cpp`` reads it 8 rows at a time in sequential streams and keeps
the outputs of up to 8 input rows in registers, so it reads at close to the memory's speed for
1-8 rows (1.4-1.9x faster than oneDNN at 2-8 rows, 1.0-1.5x than torch at 1), splitting columns
over torch's threads (up to 4 rows there: see :data:`KERNEL_MAX_ROWS_THREADS`).

It is C++ built once per machine with the host compiler (``$CXX`` or ``c++``, ``-O3
-march=native -fopenmp``, against the installed torch's headers, 1-3 s) into
``$XDG_CACHE_HOME/llm_microlibs/kernels`` (else ``~/.cache/...``; the file's name digests the
source, compiler, torch, Python and this CPU's model and flags, so a cache shared by different
machines keeps one build per CPU), on first use, and loaded with ctypes. Where it cannot be
built (no compiler) or is switched off (``LLM_SLICE_CORE_KERNEL=0``), :func:`available` is False
and products take oneDNN/torch as before; a failed build is logged once as a warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

# Products with more input rows than this take oneDNN: the kernel reads the weight once per 8
# rows, and from 16 rows on (prefill: arithmetic-bound) oneDNN's blocking is as fast or faster.
KERNEL_MAX_ROWS = 8
# ... on more than one torch thread, more than this unless the weight has at least
# KERNEL_BIG_WEIGHT elements: at 5-8 rows on a small weight the kernel is arithmetic-bound and
# gained nothing from a second thread where oneDNN did (2-vCPU VM: SmolLM2's batch-8 decode
# steps on 2 threads took 1.2x oneDNN's time), while on big weights it still reads faster
# (Falcon-7B shapes, batch 8, 2 threads: 1.33x oneDNN's tokens/s).
KERNEL_MAX_ROWS_THREADS = 4
KERNEL_BIG_WEIGHT = 2**23  # 32 MiB of float32

_SOURCE = Path(__file__).with_name("_kernel.cpp")
_log = logging.getLogger(__name__)
_lib: ctypes.CDLL | None = None
_tried = False
_lock = threading.Lock()


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llm_microlibs" / "kernels"


def _cpu() -> bytes:
    """What identifies this CPU for code built with ``-march=native``: its model and flags."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            lines = f.read().split(b"\n\n")[0].splitlines()
    except OSError:
        return platform.processor().encode()
    return b"\n".join(line for line in lines if line.startswith((b"model name", b"flags")))


def _torch_dirs() -> tuple[str, str]:
    root = Path(torch.__file__).resolve().parent
    return str(root / "include"), str(root / "lib")


# Flags tried in turn: tuned for this CPU with OpenMP (torch's threads), then for compilers
# without -fopenmp or -march=native.
_TUNINGS = (["-march=native", "-fopenmp"], ["-march=native"], [])


def _command(compiler: str, tuning: list[str], target: Path) -> list[str]:
    """The compiler command that builds ``_kernel.cpp`` into ``target`` with ``tuning``."""
    include, lib = _torch_dirs()
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    return [compiler, *tuning, "-O3", "-ffp-contract=fast", "-shared", "-fPIC", "-std=c++17",
            abi, "-I", include, str(_SOURCE), "-o", str(target),
            "-L", lib, "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib}"]  # fmt: skip


def _target(compiler: str) -> Path:
    """Where the library built by ``compiler`` for this source, torch, Python and CPU lives."""
    key = [_SOURCE.read_bytes(), compiler.encode(), torch.__version__.encode(),
           torch.__file__.encode(), platform.machine().encode(),
           platform.python_version().encode(), _cpu()]  # fmt: skip
    digest = hashlib.sha256(b"\0".join(key)).hexdigest()[:24]
    return _cache_dir() / f"product-{digest}.so"


def _build() -> Path:
    """Path of the built kernel library for this source, torch and machine (built if missing)."""
    compiler = os.environ.get("CXX") or "c++"
    target = _target(compiler)
    if target.exists():
        return target
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set $CXX)")
    target.parent.mkdir(parents=True, exist_ok=True)
    first_error = None
    for tuning in _TUNINGS:
        with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
            partial = Path(tmp.name)
        done = subprocess.run(_command(compiler, tuning, partial), capture_output=True, text=True)
        if done.returncode == 0:
            os.replace(partial, target)  # atomic: a concurrent build writes the same file
            return target
        partial.unlink(missing_ok=True)
        first_error = first_error or (done.stderr.strip().splitlines() or ["(no output)"])[-1]
    raise RuntimeError(f"{compiler} failed: {first_error}")


def _load() -> ctypes.CDLL | None:
    if os.environ.get("LLM_SLICE_CORE_KERNEL", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        _log.warning("llm_slice_core: the CPU decode kernel is not available (%s); "
                     "products use oneDNN/torch instead (slower decoding)", exc)  # fmt: skip
        return None
    fn = lib.llm_slice_core_product
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                   ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]  # fmt: skip
    cpu = torch.device("cpu")  # (explicit: a model may be built under a meta device context)
    x, w = torch.arange(6.0, device=cpu).view(2, 3), torch.arange(12.0, device=cpu).view(3, 4)
    b, y = torch.ones(4, device=cpu), torch.empty(2, 4, device=cpu)
    fn(x.data_ptr(), 2, 3, w.data_ptr(), 4, b.data_ptr(), y.data_ptr())
    if not torch.equal(y, x @ w + b):
        _log.warning("llm_slice_core: the CPU decode kernel computed a wrong product; not used")
        return None
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, built on first call; None where it is not available."""
    global _lib, _tried
    if not _tried:
        with _lock:  # (two threads' first products build it once)
            if not _tried:
                _lib, _tried = _load(), True
    return _lib


def available() -> bool:
    """True when the kernel is built and loaded (see the module doc)."""
    return library() is not None


def max_rows(weight_elements: int = 0) -> int:
    """The most input rows a product with a weight of ``weight_elements`` runs on the kernel
    with, at torch's thread count now."""
    if weight_elements >= KERNEL_BIG_WEIGHT or torch.get_num_threads() == 1:
        return KERNEL_MAX_ROWS
    return KERNEL_MAX_ROWS_THREADS


def suits(x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """True when ``x [M, K] @ w_t [K, N]`` runs on the kernel: it is available; float32 on a
    CPU; 1 to :data:`KERNEL_MAX_ROWS` rows (:data:`KERNEL_MAX_ROWS_THREADS` on more than one
    torch thread with a weight under :data:`KERNEL_BIG_WEIGHT` elements); ``w_t`` row-major
    contiguous (a packed ``weight_t``), ``bias`` (if any) contiguous float32; no gradient
    wanted; not compiling."""
    return (
        x.dim() == 2
        and 0 < x.shape[0] <= max_rows(w_t.numel())
        and x.dtype == torch.float32
        and w_t.dtype == torch.float32
        and x.device.type == "cpu"
        and w_t.device.type == "cpu"
        and w_t.dim() == 2
        and w_t.is_contiguous()
        and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()))
        and not (torch.is_grad_enabled() and (x.requires_grad or w_t.requires_grad))
        and not torch.compiler.is_compiling()
        and available()
    )


@torch.compiler.disable
def product(x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w_t + bias`` on the kernel (a new ``[M, N]`` tensor); only where :func:`suits`."""
    x = x.contiguous()
    (rows, inputs), outputs = x.shape, w_t.shape[1]
    if w_t.shape[0] != inputs or (bias is not None and bias.shape != (outputs,)):
        raise ValueError(
            f"kernel product of x {tuple(x.shape)} and w_t {tuple(w_t.shape)}"
            f"{'' if bias is None else f' with bias {tuple(bias.shape)}'} does not fit"
        )
    y = torch.empty(rows, outputs, dtype=torch.float32, device="cpu")
    library().llm_slice_core_product(
        x.data_ptr(), rows, inputs, w_t.data_ptr(), outputs,
        None if bias is None else bias.data_ptr(), y.data_ptr(),
    )  # fmt: skip
    return y
