"""Each member package installs on its own, for real, as its README says.

For every member: a fresh virtual environment; copies of the member folders (none of the
repository around them); the README's ``pip install`` lines run there as written, with no package
index (so the registry's older namesakes ``llm-sepweight``, ``socket-rpc``, ``llm-sampler`` can
never be picked) and no editable install; then the README's first Python example runs in that
environment, from a scratch folder.

An example that uses ``smollm2-sw`` (SmolLM2-135M-Instruct converted to float32 sepweight, with
its tokenizer) finds it in its working folder: the session's ``smollm2_sepweight`` (converted once
by this repository's llm_sepweight, as the READMEs do), linked in file by file. One that converts
into it itself finds it up to date.

torch and the other third-party packages are not installed per environment (torch alone is
gigabytes): the development environment's copies are exposed to each fresh one through a folder
of links, made once per session, that holds none of this repository's packages (their editable
``.pth`` files and metadata are left out, and each test checks that nothing of ours is importable
before its install).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import tomllib

pytestmark = pytest.mark.slow

REPO = Path(__file__).parents[2]
MEMBERS = sorted(p.parent.name for p in REPO.glob("*/pyproject.toml"))
NOT_COPIED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist", ".*")


def normal(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def project(member: str) -> dict:
    """The ``[project]`` table of a member's pyproject.toml."""
    return tomllib.loads((REPO / member / "pyproject.toml").read_text())["project"]


OURS = {normal(project(m)["name"]) for m in MEMBERS} | {normal(m) for m in MEMBERS}


def clean_env() -> dict[str, str]:
    """The environment without pip's or Python's settings: no index, no find-links from a pip
    config, no PYTHONPATH, no user site-packages, no model hub."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV"))}  # fmt: skip
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1",
               PYTHONNOUSERSITE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # fmt: skip
    return env


def readme_install_commands(member: str) -> list[list[str]]:
    """The arguments of every ``pip install`` line in the member's README code blocks."""
    text = (REPO / member / "README.md").read_text()
    commands = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M):
        for line in block.splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("pip install "):
                commands.append(shlex.split(line, comments=True)[2:])
    return commands


def readme_example(member: str) -> str | None:
    """The README's example: its first ```python block after a heading that says "Example" (a
    block before it may be a signature, not code), or its first one; None when it has none yet."""
    text = (REPO / member / "README.md").read_text()
    heading = re.search(r"^#+ .*example", text, re.I | re.M)
    found = re.search(r"^```python\n(.*?)^```", text[heading.end() if heading else 0 :],
                      re.S | re.M)  # fmt: skip
    return found.group(1) if found else None


@pytest.fixture(scope="session")
def third_party(tmp_path_factory) -> Path:
    """Links to every third-party package of the development environment, none of ours."""
    site = Path(sysconfig.get_path("purelib"))
    out = tmp_path_factory.mktemp("third-party")
    for entry in site.iterdir():
        if entry.suffix == ".pth" or entry.name.startswith(("__editable__", "_editable_impl_")):
            continue  # path hooks: the editable installs of our packages are such files
        if entry.name == "__pycache__":
            continue
        if entry.name.endswith((".dist-info", ".egg-info")):  # NAME-VERSION.dist-info
            name = entry.name.split("-", 1)[0]
        else:
            name = entry.name.removesuffix(".py")
        if normal(name) not in OURS:
            (out / entry.name).symlink_to(entry)
    if not (out / "hatchling").exists():
        pytest.fail("hatchling is not in the development environment: run `bash dev.sh setup`")
    return out


@pytest.fixture(scope="session")
def sources(tmp_path_factory) -> Path:
    """A folder holding a copy of each member folder and nothing else."""
    root = tmp_path_factory.mktemp("sources")
    for member in MEMBERS:
        shutil.copytree(REPO / member, root / member, ignore=NOT_COPIED)
    return root


class FreshEnv:
    """A new virtual environment (no pip of its own) that sees the third-party folder."""

    def __init__(self, path: Path, third_party: Path) -> None:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
        self.path = path
        self.python = path / "bin" / "python"
        (site,) = path.glob("lib/python*/site-packages")
        (site / "_third_party.pth").write_text(f"{third_party}\n")

    def pip_install(self, args: list[str], cwd: Path, find_links: Path | None = None):
        """``pip install ARGS`` into this environment, offline: local folders and wheels only."""
        command = [sys.executable, "-m", "pip", "--python", str(self.python), "install",
                   "--no-index", "--no-build-isolation", "--no-cache-dir", *args]  # fmt: skip
        if find_links is not None:
            command += ["--find-links", str(find_links)]
        return subprocess.run(command, cwd=cwd, env=clean_env(), capture_output=True, text=True,
                              timeout=240)  # fmt: skip

    def run(self, args: list[str], cwd: Path, timeout: float = 240):
        """Run this environment's Python in isolated mode (no script folder, no PYTHON* vars)."""
        return subprocess.run([str(self.python), "-I", *args], cwd=cwd, env=clean_env(),
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip

    def our_packages(self, cwd: Path) -> dict[str, str]:
        """Which of our packages this environment can import, and from where (nothing imported)."""
        code = ("import importlib.util as u, json, sys\n"
                f"found = {{m: u.find_spec(m) for m in {MEMBERS!r}}}\n"
                "print(json.dumps({m: s.origin for m, s in found.items() if s}))")  # fmt: skip
        proc = self.run(["-c", code], cwd)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)


def show(proc) -> str:
    """A finished process's status and the end of its output, for an assertion message."""
    out, err = proc.stdout[-4000:], proc.stderr[-4000:]
    return f"exit {proc.returncode}\n--- stdout\n{out}\n--- stderr\n{err}"


@pytest.mark.parametrize("member", MEMBERS)
def test_installs_alone_and_runs_its_readme_example(
    member, third_party, sources, tmp_path, request
):
    env = FreshEnv(tmp_path / "venv", third_party)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    assert env.our_packages(scratch) == {}, "a package of ours leaks into the fresh environment"

    commands = readme_install_commands(member)
    assert any(arg.split("[")[0] == f"./{member}" for args in commands for arg in args), (
        f"{member}/README.md gives no `pip install ./{member}` command"
    )
    for args in commands:
        proc = env.pip_install(args, cwd=sources)
        assert proc.returncode == 0, f"pip install {shlex.join(args)}\n{show(proc)}"

    found = env.our_packages(scratch)
    assert member in found
    for name, origin in found.items():  # installed copies, never the repository's folders
        assert Path(origin).is_relative_to(env.path), (name, origin)

    example = readme_example(member)
    if example is None:  # a README still being written: import it and touch its public names
        example = f"import {member}\nfor name in getattr({member}, '__all__', []):\n"
        example += f"    getattr({member}, name)\n"
    if "smollm2-sw" in example:  # hard links: the example's own writes replace, never modify
        model = request.getfixturevalue("smollm2_sepweight")  # tests/conftest.py, float32
        shutil.copytree(model, scratch / "smollm2-sw", copy_function=os.link)
    (scratch / "readme_example.py").write_text(example)
    proc = env.run(["readme_example.py"], cwd=scratch)
    assert proc.returncode == 0, f"{member}/README.md example\n{show(proc)}"

    for script in project(member).get("scripts", {}):
        proc = subprocess.run([str(env.path / "bin" / script), "--help"], cwd=scratch,
                              env=clean_env(), capture_output=True, text=True)  # fmt: skip
        assert proc.returncode == 0 and "usage" in proc.stdout, show(proc)


def namesake_wheel(directory: Path, name: str, version: str) -> Path:
    """A wheel standing for the registry's older, unrelated package of the same name."""
    stem = f"{normal(name)}-{version}"
    path = directory / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr(f"{normal(name)}/__init__.py", "")
        whl.writestr(f"{stem}.dist-info/METADATA",
                     f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")  # fmt: skip
        whl.writestr(f"{stem}.dist-info/WHEEL",
                     "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")  # fmt: skip
        whl.writestr(f"{stem}.dist-info/RECORD", "")
    return path


@pytest.mark.parametrize(
    ("member", "given", "missing"),
    [
        ("llm_llama_model", ["llm_slice_core"], "llm_sepweight"),
        ("llm_falcon_model", ["llm_sepweight"], "llm_slice_core"),
        ("llm_partial_run", ["llm_sepweight", "llm_sampler"], "socket_rpc"),
    ],
)
def test_a_missing_sibling_fails_at_install_time(
    member, given, missing, third_party, sources, tmp_path
):
    """pip refuses before installing anything, naming the requirement; the registry's namesake
    (an older version on the index) does not satisfy it."""
    env = FreshEnv(tmp_path / "venv", third_party)
    index = tmp_path / "index"
    index.mkdir()
    namesake_wheel(index, missing.replace("_", "-"), "0.10.0")
    proc = env.pip_install([f"./{m}" for m in [*given, member]], cwd=sources, find_links=index)
    assert proc.returncode != 0, show(proc)
    name = missing.replace("_", "[-_]")  # pip writes the requirement's name normalised
    refused = rf"No matching distribution found for {name}<2,>=1\.0"
    assert re.search(refused, proc.stderr), show(proc)
    assert "(from versions: 0.10.0)" in proc.stderr, show(proc)
    assert env.our_packages(tmp_path) == {}  # nothing was installed


def test_every_sibling_requirement_excludes_the_namesakes():
    """Version 1.x everywhere, and every requirement of a sibling (extras included) is
    ``>=1.0,<2``: the registry's 0.x packages of the same names never satisfy one."""
    for member in MEMBERS:
        meta = project(member)
        assert meta["version"].startswith("1."), member
        requirements = list(meta.get("dependencies", []))
        for extra in meta.get("optional-dependencies", {}).values():
            requirements += extra
        for requirement in requirements:
            name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)
            if normal(name) in OURS:
                specifier = requirement[len(name) :].replace(" ", "")
                assert specifier == ">=1.0,<2", (member, requirement)
