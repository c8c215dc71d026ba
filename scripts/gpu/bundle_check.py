"""Check a GPU bundle (scripts/gpu_bundle.sh) before it travels: every wheel installs on the GPU
machine's CPython 3.12 / manylinux x86_64 (or is pure Python), one version per project (two stop
`pip install --no-deps` there), and the whole bundle stays under the size that travels.

    python scripts/gpu/bundle_check.py BUNDLE_DIR [--max-mib 50]

Prints one line per wheel and the total; exits 1 naming every problem.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from packaging.utils import InvalidWheelFilename, parse_wheel_filename

MAX_MIB = 50.0
_MANYLINUX_X86_64 = re.compile(r"^(manylinux1|manylinux2010|manylinux2014|manylinux_2_\d+)_x86_64$")


def wheel_problem(name: str) -> str | None:
    """Why the wheel `name` would not install on CPython 3.12 x86_64 Linux, or None if it would."""
    try:
        project, version, _, tags = parse_wheel_filename(name)
    except InvalidWheelFilename as exc:
        return f"{name}: not a wheel file name ({exc})"
    for tag in tags:
        pure = tag.abi == "none" and tag.platform == "any" and tag.interpreter in ("py3", "py312", "cp312")
        binary = (
            tag.interpreter == "cp312"
            and tag.abi in ("cp312", "abi3", "none")
            and _MANYLINUX_X86_64.match(tag.platform) is not None
        )
        if pure or binary:
            return None
    shown = ", ".join(sorted(str(t) for t in tags))
    return f"{name}: tags {shown} do not install on CPython 3.12 manylinux x86_64"


def check_bundle(bundle: Path, max_mib: float = MAX_MIB) -> tuple[list[str], list[str]]:
    """(lines describing the bundle, problems) for the bundle directory."""
    lines, problems = [], []
    wheels = sorted((bundle / "wheels").glob("*.whl")) if (bundle / "wheels").is_dir() else []
    projects: dict[str, list[str]] = {}
    for wheel in wheels:
        lines.append(f"  {wheel.name}  {wheel.stat().st_size / 2**20:.2f} MiB")
        problem = wheel_problem(wheel.name)
        if problem:
            problems.append(problem)
        else:
            projects.setdefault(str(parse_wheel_filename(wheel.name)[0]), []).append(wheel.name)
    problems += [
        f"two versions of {p}: {', '.join(names)}" for p, names in projects.items() if len(names) > 1
    ]
    total = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()) / 2**20
    lines.append(f"bundle {bundle}: {len(wheels)} wheels, {total:.1f} MiB in all (limit {max_mib:g} MiB)")
    if total > max_mib:
        problems.append(f"the bundle is {total:.1f} MiB, over the {max_mib:g} MiB that may travel")
    return lines, problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--max-mib", type=float, default=MAX_MIB)
    args = parser.parse_args()
    lines, problems = check_bundle(args.bundle, args.max_mib)
    print("\n".join(lines))
    if problems:
        print("gpu_bundle: the bundle is not usable:\n  " + "\n  ".join(problems), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
