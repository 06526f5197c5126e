"""Who may import whom (docs/architecture.md): read from every source file, and checked in a
fresh interpreter (a lazy or indirect import shows up in ``sys.modules``)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
OURS = {"llm_sampler", "socket_rpc", "llm_sepweight", "llm_slice_core", "llm_llama_model",
        "llm_falcon_model", "llm_partial_run"}  # fmt: skip
MODELS = {"llm_llama_model", "llm_falcon_model"}
FORBIDDEN = {
    "llm_slice_core": OURS - {"llm_slice_core"},  # torch only
    "llm_llama_model": {"llm_partial_run", "socket_rpc", "llm_sampler", "llm_falcon_model"},
    "llm_falcon_model": {"llm_partial_run", "socket_rpc", "llm_sampler", "llm_llama_model"},
    "llm_sampler": OURS - {"llm_sampler"},
    "llm_sepweight": MODELS | {"llm_slice_core", "llm_partial_run", "socket_rpc", "llm_sampler"},
}


def imported(package: str) -> dict[str, set[str]]:
    """Top-level names each source file of ``package`` imports (relative imports excluded)."""
    found = {}
    for path in sorted((ROOT / package / "src" / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_source_file_imports_a_forbidden_package(package):
    files = imported(package)
    assert files, f"no source files found for {package}"
    bad = {f: sorted(n & FORBIDDEN[package]) for f, n in files.items() if n & FORBIDDEN[package]}
    assert not bad


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_importing_a_package_loads_no_forbidden_package(package):
    code = f"import sys, json, {package}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = {name.split(".")[0] for name in json.loads(out.stdout)}
    assert not loaded & FORBIDDEN[package]


def test_socket_rpc_does_not_import_torch_at_import_time():
    code = "import sys, socket_rpc; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
