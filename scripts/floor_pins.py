"""Print pip pins at the lowest versions pyproject.toml allows (`make test-floors` installs them).

Each dependency (and each of the extras named on the command line) becomes ``name==floor``: its ``>=``
bound, or its ``==`` pin as written. A dependency with neither has no floor to test and is an error,
so a new unbounded dependency cannot slip past the floor run.

    python scripts/floor_pins.py dev    # the runtime dependencies and the dev extra's
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
_REQUIREMENT = re.compile(r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?P<extras>\[[^\]]*\])?\s*(?P<spec>[^;]*)")


def floor_pin(requirement: str) -> str:
    """``"peft>=0.18,<1"`` -> ``"peft==0.18"``; ``"torch==2.14.1"`` stays as it is."""
    match = _REQUIREMENT.match(requirement)
    if match is None:
        raise ValueError(f"{requirement!r}: not a requirement this script reads")
    name, extras = match["name"], match["extras"] or ""
    clauses = [c.strip() for c in match["spec"].split(",") if c.strip()]
    for op in ("==", ">="):
        versions = [c[len(op):].strip() for c in clauses if c.startswith(op)]
        if versions:
            return f"{name}{extras}=={versions[0]}"
    raise ValueError(f"{requirement!r} in {PYPROJECT.name}: no '>=' floor or '==' pin; give it a floor "
                     "(the lowest version the test suite passed on) so `make test-floors` can install it")


def floor_pins(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise ValueError(f"{pyproject}: no extra {unknown}; it has {sorted(optional)}")
    requirements = list(project["dependencies"]) + [r for e in extras for r in optional[e]]
    pins: dict[str, str] = {}
    for requirement in requirements:
        pin = floor_pin(requirement)
        pins.setdefault(pin.split("==")[0].split("[")[0].lower(), pin)  # an extra repeating a dependency
    return list(pins.values())


def main(argv: list[str]) -> int:
    try:
        print("\n".join(floor_pins(PYPROJECT, argv)))
    except ValueError as exc:
        print(f"floor_pins: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
