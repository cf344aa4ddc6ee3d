"""The installed package: what the wheel ships, and the command as a wheel install runs it (outside the repo)."""

from __future__ import annotations

import ast
import glob
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import mmllm

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
HEAVY = ("torch", "transformers", "diffusers", "accelerate", "open_clip", "peft")


def _tracked(folder: str) -> set[str]:
    try:
        out = subprocess.run(["git", "ls-files", folder], cwd=REPO, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return {line for line in out.stdout.splitlines() if Path(line).name not in (".gitignore", ".gitattributes")}


def test_package_data_globs_ship_exactly_the_tracked_toyworld_weights_and_passages():
    # setuptools expands each pattern with glob.glob(recursive=True) from the package's folder: `*` skips
    # dot-files (the weights' .gitignore, pretrain_toy_components.py's .state/ and .cache/)
    package = REPO / "mmllm" / "toyworld"
    shipped = {
        str((Path(path)).relative_to(REPO))
        for pattern in PYPROJECT["tool"]["setuptools"]["package-data"]["mmllm.toyworld"]
        for path in glob.glob(str(package / pattern), recursive=True)
        if os.path.isfile(path)
    }
    tracked = _tracked("mmllm/toyworld/weights") | _tracked("mmllm/toyworld/passages")
    assert tracked, "no tracked weights found"
    # eval's held-out text and its licence notice (the PSF licence asks that the notice travel with the text)
    assert {"mmllm/toyworld/passages/heldout.txt", "mmllm/toyworld/passages/NOTICE"} <= tracked
    assert sorted(tracked - shipped) == [], "tracked weights or passages the wheel would leave out"
    assert sorted(shipped - tracked) == [], "untracked files the wheel would ship"


def _distribution(requirement: str) -> str:
    """``transformers>=5.0,<6`` -> ``transformers``, normalised as PEP 503 compares names."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group()).lower()


def test_every_library_the_package_imports_is_a_declared_dependency():
    # a library only installed because another one pulls it in (jinja2 came with torch, unbounded) can go
    # missing or be too old for what mmllm does with it
    imported = set()
    for path in (REPO / "mmllm").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = sorted(imported - set(sys.stdlib_module_names) - {"mmllm"})
    providers = importlib.metadata.packages_distributions()
    project = PYPROJECT["project"]
    declared = {_distribution(r) for r in project["dependencies"]}
    declared |= {_distribution(r) for extra in project["optional-dependencies"].values() for r in extra}
    undeclared = {module: providers.get(module) for module in third_party
                  if not {_distribution(d) for d in providers.get(module, [])} & declared}
    assert len(third_party) >= 10 and undeclared == {}


def _floor_pins():
    spec = importlib.util.spec_from_file_location("floor_pins", REPO / "scripts" / "floor_pins.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_test_floors_installs_every_dependency_at_its_declared_floor():
    floors = _floor_pins()
    assert floors.floor_pin("peft>=0.18,<1") == "peft==0.18"
    assert floors.floor_pin("torch==2.14.1") == "torch==2.14.1"
    assert floors.floor_pin("deepspeed[autotuning] >= 0.19, < 0.20") == "deepspeed[autotuning]==0.19"
    with pytest.raises(ValueError, match="no '>=' floor"):  # nothing to install: the floor run would skip it
        floors.floor_pin("numpy<3")
    pins = floors.floor_pins(REPO / "pyproject.toml", ["dev"])
    project = PYPROJECT["project"]
    declared = [_distribution(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    assert sorted(_distribution(p) for p in pins) == sorted(set(declared))
    assert all(re.fullmatch(r"[A-Za-z0-9_.\[\]-]+==[0-9][0-9.]*", p) for p in pins), pins


def test_the_installed_versions_are_in_the_declared_ranges():
    """The environment the tests run in is one the declared ranges allow (the usual one, or `make test-floors`'s)."""
    from packaging.requirements import Requirement

    project = PYPROJECT["project"]
    outside = {}
    for text in project["dependencies"] + project["optional-dependencies"]["dev"]:
        requirement = Requirement(text)
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an extra this environment did without (deepspeed)
        if not requirement.specifier.contains(installed, prereleases=True):
            outside[requirement.name] = f"{installed} not in {requirement.specifier}"
    assert outside == {}


def test_the_version_is_written_once_and_printed_by_the_command(tmp_path):
    assert PYPROJECT["project"]["dynamic"] == ["version"] and "version" not in PYPROJECT["project"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "mmllm.__version__"}
    run = subprocess.run([sys.executable, "-m", "mmllm", "--version"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"mmllm {mmllm.__version__}"


def test_help_and_usage_errors_of_every_command_import_no_torch():
    # `mmllm X --help` and a mistyped option answer in a fraction of a second: the libraries load in the commands
    code = f"""
import contextlib, io, sys
from mmllm.cli import build_parser, main

def commands(parser, prefix=()):
    sub = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    if not sub:
        yield list(prefix)
        return
    for name, child in sub[0].choices.items():
        yield from commands(child, (*prefix, name))

seen = []
for command in commands(build_parser()):
    for argv in ([*command, "--help"], [*command, "--no-such-option"]):  # help; a usage error (exit 2)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                main(argv)
            except SystemExit:
                pass
    seen.append(" ".join(command))
print(len(seen), sorted(m for m in {HEAVY!r} if m in sys.modules))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    count, loaded = run.stdout.strip().split(" ", 1)
    assert int(count) >= 12  # train ... world distil: every leaf command was asked
    assert loaded == "[]"


@pytest.fixture(scope="module")
def wheel_layout(tmp_path_factory) -> Path:
    """The package alone in a site-packages-like folder, as a wheel installs it (no configs/, data/, pyproject)."""
    site = tmp_path_factory.mktemp("site-packages")
    shutil.copytree(REPO / "mmllm", site / "mmllm", ignore=shutil.ignore_patterns("__pycache__", "weights"))
    (site / "mmllm" / "toyworld" / "weights").symlink_to(REPO / "mmllm" / "toyworld" / "weights")
    return site


def _run_installed(site: Path, cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "mmllm", *argv], capture_output=True, text=True, env=env, cwd=cwd)


def test_help_names_the_docs_as_a_wheel_install_has_them(wheel_layout, tmp_path):
    """`--help` sent a wheel's user to docs/ and docs/inference.md, which a wheel does not install: it names the
    pages by title and file in the source repository, saying so; run from a clone, their paths there."""
    said = " ".join(_run_installed(wheel_layout, tmp_path, "--help").stdout.split())
    assert "documented in the docs/ folder of mmllm's source repository (a wheel does not install the docs)" in said
    said = " ".join(_run_installed(wheel_layout, tmp_path, "infer", "--help").stdout.split())
    assert ("the schema: 'Batch inference', docs/inference.md in mmllm's source repository (a wheel does not "
            "install the docs)") in said, said
    from_clone = subprocess.run([sys.executable, "-m", "mmllm", "infer", "--help"], capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path, check=True).stdout
    page = re.search(r"the schema: (\S+)\)", " ".join(from_clone.split())).group(1)
    assert page == str(REPO / "docs" / "inference.md") and Path(page).is_file()


def test_repository_only_commands_say_so_from_a_wheel_install(wheel_layout, tmp_path):
    run = _run_installed(wheel_layout, tmp_path, "demo", "--tiny", "--quick", "--output", str(tmp_path / "out"))
    assert run.returncode == 2, run.stderr
    assert "a wheel does not install" in run.stderr and "run `mmllm demo`" in run.stderr
    assert str(wheel_layout) in run.stderr  # where this mmllm is, not a repository that is not there

    run = _run_installed(wheel_layout, tmp_path, "world", "distil", "--out", str(tmp_path / "plain.jsonl"))
    assert run.returncode == 2, run.stderr
    assert "give --assembly" in run.stderr and "config file not found" not in run.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "plain.jsonl").exists()
