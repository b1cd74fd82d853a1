"""Install every dependency of wsi-il at its declared floor in a new venv, and run the test suite there.

pyproject.toml sets lower bounds only; this checks that they are true. Each ``name>=X`` becomes ``name==X.*``
(``X`` padded to two parts, so ``hypothesis>=6`` gives the 6.0 series and ``torch>=2.1`` the 2.1 series).
Needs the package index (several GB for torch's CUDA build) and about 6 GB of disk.

    python tools/check_floors.py --python python3.10 --venv /tmp/floors        # then the suite runs
    python tools/check_floors.py --python python3.10 --venv /tmp/floors --print # only print the pins

Python 3.10 is the oldest Python that requires-python admits; torch releases before 2.3 need numpy 1.x,
which the numpy floor gives.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def floor_pins(pyproject: Path, extras: tuple[str, ...] = ("test",)) -> list[str]:
    """Return ``name==X.*`` (or ``name==X`` for a three-part floor) for each ``name>=X`` requirement."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    pins = []
    for requirement in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)>=([0-9.]+)", requirement.replace(" ", ""))
        if match is None:
            raise SystemExit(f"{pyproject}: {requirement!r} is not of the form name>=version")
        name, version = match.groups()
        parts = version.split(".")
        pins.append(f"{name}=={version}" if len(parts) >= 3 else f"{name}=={'.'.join((parts + ['0'])[:2])}.*")
    return pins


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default="python3.10", help="the interpreter to build the venv with")
    parser.add_argument("--venv", type=Path, required=True, help="where to make the venv (must not exist)")
    parser.add_argument("--print", action="store_true", help="print the pins and stop")
    args = parser.parse_args()
    pins = floor_pins(ROOT / "pyproject.toml")
    print("\n".join(pins))
    if args.print:
        return 0
    if args.venv.exists():
        raise SystemExit(f"{args.venv} exists: give a new folder")
    python = str(args.venv / "bin" / "python")
    steps = [
        [args.python, "-m", "venv", str(args.venv)],
        [python, "-m", "pip", "install", *pins],
        [python, "-m", "pip", "install", "--no-deps", "-e", str(ROOT)],
        [python, "-m", "pip", "list"],
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
    ]
    for step in steps:
        print("+", " ".join(step), flush=True)
        if subprocess.run(step, cwd=ROOT).returncode != 0:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
