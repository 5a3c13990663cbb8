"""Checks the wheel and sdist in a directory (see .ci/check_wheel): tags, files, metadata. Exits non-zero with a
list of every problem found."""

from __future__ import annotations

import re
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

WHEEL_NAME = re.compile(r"difattn-(?P<version>[^-]+)-cp311-abi3-(?P<platform>[a-z0-9_]+)\.whl")
MANYLINUX = re.compile(r"(manylinux_\d+_\d+|manylinux2014)_(x86_64|aarch64)")
WHEEL_FILES = ("_core.abi3.so", "_core.pyi", "py.typed", "__init__.py", "triton_kernels/__init__.py")
SDIST_FILES = ("LICENSE", "pyproject.toml", "Cargo.toml", "Cargo.lock", "build_backend/difattn_build.py",
               "rust/lib.rs", "python/difattn/__init__.py", "README.md")
URLS = {"Homepage", "Repository", "Issues", "Documentation"}


def check_metadata(text: str, where: str) -> list[str]:
    meta = Parser().parsestr(text)
    problems = []
    if meta["License-Expression"] != "Apache-2.0" or meta["License-File"] != "LICENSE":
        problems.append(f"{where}: License-Expression/License-File are {meta['License-Expression']}/{meta['License-File']}")
    if any(c.startswith("License ::") for c in meta.get_all("Classifier") or ()):
        problems.append(f"{where}: a License classifier next to License-Expression (PEP 639 forbids both)")
    if not meta["Author"] and not meta["Author-email"]:
        problems.append(f"{where}: no author")
    urls = {u.split(",")[0] for u in meta.get_all("Project-URL") or ()}
    if not URLS <= urls:
        problems.append(f"{where}: project URLs {sorted(urls)} lack {sorted(URLS - urls)}")
    if meta["Requires-Python"] != ">=3.11":
        problems.append(f"{where}: Requires-Python is {meta['Requires-Python']}")
    for req in meta.get_all("Requires-Dist") or ():
        if req.startswith("triton") and "extra ==" not in req:
            problems.append(f"{where}: triton is a hard dependency ({req}); CPU-only installs must not need it")
    return problems


def check_wheel(path: Path) -> list[str]:
    match = WHEEL_NAME.fullmatch(path.name)
    if not match:
        return [f"{path.name}: not an abi3 (cp311-abi3) difattn wheel"]
    problems = []
    if not MANYLINUX.fullmatch(match["platform"]):
        problems.append(f"{path.name}: platform tag {match['platform']} is not manylinux (auditwheel would refuse it)")
    with zipfile.ZipFile(path) as wheel:
        names = set(wheel.namelist())
        info = f"difattn-{match['version']}.dist-info"
        problems += [f"{path.name}: missing difattn/{f}" for f in WHEEL_FILES if f"difattn/{f}" not in names]
        if f"{info}/licenses/LICENSE" not in names:
            problems.append(f"{path.name}: LICENSE not shipped in {info}/licenses/")
        strays = sorted({n.split("/")[0] for n in names} - {"difattn", info})
        if strays:
            problems.append(f"{path.name}: top-level entries other than difattn: {strays}")
        problems += check_metadata(wheel.read(f"{info}/METADATA").decode(), path.name)
    return problems


def check_sdist(path: Path) -> list[str]:
    with tarfile.open(path) as sdist:
        root = path.name.removesuffix(".tar.gz")
        names = set(sdist.getnames())
        problems = [f"{path.name}: missing {f}" for f in SDIST_FILES if f"{root}/{f}" not in names]
        if any("/target/" in n for n in names):
            problems.append(f"{path.name}: contains cargo's target/ directory")
        license_text = sdist.extractfile(f"{root}/LICENSE").read().decode() if f"{root}/LICENSE" in names else ""
        if "Apache License" not in license_text or "Version 2.0, January 2004" not in license_text:
            problems.append(f"{path.name}: LICENSE is not the Apache License 2.0 text")
        problems += check_metadata(sdist.extractfile(f"{root}/PKG-INFO").read().decode(), path.name)
    return problems


def main(directory: str) -> int:
    wheels, sdists = sorted(Path(directory).glob("*.whl")), sorted(Path(directory).glob("*.tar.gz"))
    problems = [] if wheels and len(sdists) == 1 else [f"expected wheels and one sdist in {directory}"]
    for wheel in wheels:
        problems += check_wheel(wheel)
    for sdist in sdists:
        problems += check_sdist(sdist)
    for problem in problems:
        print("check_dist:", problem, file=sys.stderr)
    if not problems:
        print("check_dist: ok:", ", ".join(p.name for p in wheels + sdists))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
