"""Where shipped files live: ``package:<module>/<sub/path>`` names a path inside an installed Python
package (found with importlib, never imported), so configs work from any working directory and in
any install (editable or wheel). ``pkg:`` is accepted as a short alias. Anything else is returned
unchanged (a hub id or an ordinary path)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
from pathlib import Path

from mmllm.config import ConfigError

PREFIXES = ("package:", "pkg:")

# A clone (run in place or installed with `pip install -e .`) holds the package beside the repository's configs/,
# data/ and scripts/; a wheel installs the package alone, into site-packages.
SOURCE_TREE = Path(__file__).resolve().parent.parent


def repository_root() -> Path | None:
    """The repository this mmllm runs from, or None when it is installed from a wheel (no configs/, data/)."""
    return SOURCE_TREE if (SOURCE_TREE / "pyproject.toml").is_file() else None


# each docs/ page's title (its first line), by which a user of a wheel, which installs no docs/, finds it in the
# source repository (tests/test_docs.py holds them to the pages)
DOC_TITLES = {
    "checkpoints.md": "Checkpoints",
    "commands.md": "Commands",
    "concepts.md": "The pieces",
    "configs.md": "Configs",
    "data.md": "Data formats",
    "development.md": "Development",
    "distributed.md": "Many processes, and surviving faults",
    "embedded-default.md": "The embedded default",
    "inference.md": "Batch inference",
    "install.md": "Install",
    "python.md": "Using mmllm from Python",
}
NO_DOCS = "a wheel does not install the docs"


def docs_folder() -> str:
    """Where the documentation is, for a message or a ``--help`` text: the ``docs/`` folder of the repository this
    mmllm runs from, else that folder of mmllm's source repository, said to be there (:func:`repository_root`)."""
    repo = repository_root()
    if repo is not None and (repo / "docs").is_dir():
        return str(repo / "docs")
    return f"the docs/ folder of mmllm's source repository ({NO_DOCS})"


def doc_page(page: str, section: str | None = None) -> str:
    """Where the docs/ page ``page`` (``inference.md``) is, for a message or a ``--help`` text: its path in the
    repository this mmllm runs from; from a wheel, its title and file in the source repository, said to be there.
    ``section``: a heading of it to name too."""
    repo = repository_root()
    at = f", section {section!r}" if section else ""
    if repo is not None and (repo / "docs" / page).is_file():
        return f"{repo / 'docs' / page}{at}"
    return f"{DOC_TITLES[page]!r}{at}, docs/{page} in mmllm's source repository ({NO_DOCS})"


def is_package_path(value: str) -> bool:
    return value.startswith(PREFIXES)


def package_path(value: str, must_exist: bool = True) -> Path:
    """``package:module/sub/path`` -> the absolute path inside the installed package ``module``."""
    prefix = next(p for p in PREFIXES if value.startswith(p))
    module, _, sub = value[len(prefix) :].partition("/")
    locations = _package_locations(module)
    if not locations:
        raise ConfigError(f"{value}: no installed Python package named {module!r} (run `make setup`)")
    path = Path(locations[0]) / sub
    if must_exist and not path.exists():
        raise ConfigError(f"{value}: {path} does not exist")
    return path


def _package_locations(module: str) -> list[str]:
    """The folders of package ``module``, found level by level without importing any of it (``find_spec`` of
    ``a.b`` would import ``a``, running its ``__init__.py``: a config or checkpoint names it, not the user)."""
    head, *rest = module.split(".")
    try:
        spec = importlib.util.find_spec(head)  # a top-level name: located, not imported
    except (ImportError, ValueError):
        return []
    for i in range(len(rest)):
        if spec is None or not spec.submodule_search_locations:
            return []
        spec = importlib.machinery.PathFinder.find_spec(".".join([head, *rest[: i + 1]]),
                                                        list(spec.submodule_search_locations))
    return list(spec.submodule_search_locations or []) if spec is not None else []


def resolve_source(value: str) -> str:
    """A ``package:`` path -> its absolute path as a string; a local path with ``~`` expanded; anything else (a
    hub id) unchanged."""
    return str(package_path(value)) if is_package_path(value) else os.path.expanduser(value)


def resolve_location(value: str) -> Path:
    """A ``package:`` path or a local path (``~`` expanded) -> a Path (need not exist)."""
    return package_path(value, must_exist=False) if is_package_path(value) else Path(value).expanduser()
