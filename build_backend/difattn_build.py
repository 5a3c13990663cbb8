"""PEP 517 build backend of difattn: maturin's, after a check that a Rust toolchain is there.

Without ``cargo`` on PATH maturin tries to download a temporary toolchain and, offline or behind a proxy, fails
with a long traceback; an old toolchain fails deep inside the crate build. This backend says what is missing in
one line instead. Everything else is maturin's (the hooks below are re-exported unchanged once the check passed).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from typing import Any, Callable

import maturin

_RUSTUP = "install it from https://rustup.rs (curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh), then rerun"


def _check_rust() -> None:
    cargo = shutil.which("cargo")
    if cargo is None:
        raise SystemExit(f"difattn: building from source needs a Rust toolchain and `cargo` is not on PATH; {_RUSTUP}")
    with open("Cargo.toml", "rb") as f:
        needed = tomllib.load(f)["package"]["rust-version"]
    found = subprocess.run([cargo, "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"(\d+)\.(\d+)", found)
    if match and tuple(map(int, match.groups())) < tuple(map(int, needed.split(".")[:2])):
        raise SystemExit(
            f"difattn: building from source needs Rust >= {needed}, found {found.strip()}; run `rustup update`"
        )


def _checked(hook: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        _check_rust()
        return hook(*args, **kwargs)

    run.__name__ = hook.__name__
    return run


build_wheel = _checked(maturin.build_wheel)
build_sdist = maturin.build_sdist  # an sdist is source only: no toolchain needed
build_editable = _checked(maturin.build_editable)
get_requires_for_build_wheel = _checked(maturin.get_requires_for_build_wheel)
get_requires_for_build_sdist = maturin.get_requires_for_build_sdist
get_requires_for_build_editable = _checked(maturin.get_requires_for_build_editable)
prepare_metadata_for_build_wheel = _checked(maturin.prepare_metadata_for_build_wheel)
prepare_metadata_for_build_editable = _checked(maturin.prepare_metadata_for_build_editable)
