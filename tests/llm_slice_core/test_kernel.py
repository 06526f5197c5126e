"""The decode product kernel: built here, equal to the matrix product for every shape it takes,
the same bits on any thread count, used by packed groups for 1-16 rows, and a clean fallback
where it cannot be built or is switched off."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from llm_slice_core import Linears, kernel


@pytest.fixture(autouse=True)
def _built():
    assert kernel.available(), "the decode kernel could not be built here (see the log)"


def reference(x, w, b):
    out = x.double() @ w.double()
    return (out if b is None else out + b.double()).float()


@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize("inputs, outputs", [(1, 1), (7, 15), (8, 16), (19, 33), (64, 100)])
def test_every_row_count_and_odd_shape_equals_the_matrix_product(threads, inputs, outputs):
    gen = torch.Generator().manual_seed(inputs * outputs)
    w = torch.randn(inputs, outputs, generator=gen)
    b = torch.randn(outputs, generator=gen)
    for rows in [*range(1, kernel.KERNEL_MAX_ROWS + 1), 13, 16]:  # (> 8: two row groups)
        x = torch.randn(rows, inputs, generator=gen)
        for bias in (None, b):
            most = kernel.KERNEL_MAX_ROWS if threads == 1 else kernel.KERNEL_MAX_ROWS_THREADS
            assert kernel.suits(x, w, bias) == (rows <= most) and kernel.max_rows() == most
            torch.testing.assert_close(
                kernel.product(x, w, bias), reference(x, w, bias), atol=1e-5, rtol=1e-5
            )


def test_on_several_threads_only_a_big_weight_takes_more_than_4_rows(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    small, x = torch.randn(32, 48), torch.randn(8, 32)
    assert kernel.suits(x[:4], small) and not kernel.suits(x, small)
    monkeypatch.setattr(kernel, "KERNEL_BIG_WEIGHT", small.numel())
    assert kernel.suits(x, small) and kernel.max_rows(small.numel()) == kernel.KERNEL_MAX_ROWS
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert kernel.max_rows() == kernel.KERNEL_MAX_ROWS


def test_the_result_does_not_depend_on_the_thread_count():
    """SmolLM2's gate and up side by side; columns are split over threads, sums are not."""
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(8, 576, generator=gen), torch.randn(576, 3072, generator=gen) / 24
    b = torch.randn(3072, generator=gen)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            results.append(kernel.product(x, w, b))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(results[0], r) for r in results[1:])
    torch.testing.assert_close(results[0], reference(x, w, b), atol=1e-4, rtol=1e-5)


def test_what_the_kernel_does_not_take():
    x, w = torch.randn(4, 32), torch.randn(32, 48)
    assert kernel.suits(x, w)
    assert not kernel.suits(torch.randn(kernel.KERNEL_MAX_ROWS + 1, 32), w)  # prefill: oneDNN
    assert not kernel.suits(x, w.t().contiguous().t())  # not row-major [in, out]
    assert not kernel.suits(x, torch.randn(32, 96)[:, ::2])
    assert not kernel.suits(x.bfloat16(), w.bfloat16())
    assert not kernel.suits(x.double(), w.double())
    assert not kernel.suits(x, w, torch.randn(96)[::2])
    assert not kernel.suits(x, w.clone().requires_grad_())
    with pytest.raises(ValueError, match="does not fit"):
        kernel.product(x, torch.randn(31, 48))
    with pytest.raises(ValueError, match="bias"):
        kernel.product(x, w, torch.randn(47))


@pytest.mark.parametrize("bias_after", [True, False])
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
def test_a_packed_group_runs_its_decode_products_on_the_kernel(bias_after, threads, monkeypatch):
    torch.manual_seed(0)
    lins = [nn.Linear(24, n).requires_grad_(False) for n in (32, 16)]
    group = Linears(*lins, bias_after=bias_after)
    calls = []
    real = kernel.product
    monkeypatch.setattr(kernel, "product", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    x = torch.randn(kernel.KERNEL_MAX_ROWS + 1, 24)
    want = torch.cat([lin(x) for lin in lins], -1)
    group(x[:3])
    assert calls == []  # not packed: the layers' own [out, in] weights
    group.pack()
    most = kernel.max_rows()
    for rows in (1, most, most + 1, kernel.KERNEL_MAX_ROWS + 1):
        torch.testing.assert_close(group(x[:rows]), want[:rows], atol=1e-5, rtol=0)
    assert calls == [1, most]


def test_the_library_is_built_once_and_reused():
    path = kernel._build()
    stamp = path.stat().st_mtime_ns
    assert kernel._build() == path and path.stat().st_mtime_ns == stamp
    assert path.parent == kernel._cache_dir() and path.name.startswith("product-")


def test_another_cpu_or_compiler_gets_its_own_build(monkeypatch):
    """Built with -march=native: a cache shared by machines must not hand one CPU's build to
    another."""
    here = kernel._target("c++")
    assert kernel._target("g++") != here
    monkeypatch.setattr(kernel, "_cpu", lambda: b"model name : another CPU")
    assert kernel._target("c++") != here


SCRIPT = textwrap.dedent(
    """
    import torch
    from torch import nn
    from llm_slice_core import Linears, kernel
    lin = nn.Linear(16, 32).requires_grad_(False)
    group = Linears(lin, transpose=False)
    group.pack()
    x = torch.randn(4, 16)
    torch.testing.assert_close(group(x), lin(x), atol=1e-5, rtol=0)
    print(kernel.available(), group.transpose)
    """
)


@pytest.mark.parametrize(
    "env, why",
    [({"CXX": "/nonexistent/c++"}, "no C++ compiler"), ({"LLM_SLICE_CORE_KERNEL": "0"}, None)],
)
def test_without_the_kernel_products_fall_back(env, why, tmp_path):
    """No compiler (a fresh cache, so nothing built before helps) or the kernel switched off:
    not available, the model's own layouts kept, products still right; a failed build warns."""
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path), **env},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]
    if why:
        assert why in done.stderr and "oneDNN" in done.stderr
    else:
        assert done.stderr == ""
    assert not list(tmp_path.glob("llm_microlibs/kernels/*.so"))


def test_a_failed_build_is_logged_once(monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(kernel, "_lib", None)
    monkeypatch.setattr(kernel, "_tried", False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with caplog.at_level(logging.WARNING, logger="llm_slice_core.kernel"):
        assert not kernel.available() and not kernel.available()
    assert len(caplog.records) == 1 and "/nonexistent/c++" in caplog.text
