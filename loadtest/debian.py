"""Debian's packages for the real servers that load and deployment runs start (HAProxy, podman): found on
PATH or in /usr/sbin, else installed with apt-get, refreshing the package lists once if the first try fails."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def binary(name: str) -> str | None:
    """Where program `name` is (root's tools live in /usr/sbin, which a user's PATH may lack)."""
    return shutil.which(name) or shutil.which(name, path=SYSTEM_PATH)


def ensure(packages: dict[str, str], timeout: float = 900) -> None:
    """Install the packages (package -> the program it provides) whose program is not there yet."""
    missing = [package for package, program in packages.items() if binary(program) is None]
    if not missing:
        return
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": SYSTEM_PATH}
    install = ["apt-get", "install", "-y", "-qq", *missing]
    if subprocess.run(install, capture_output=True, check=False, timeout=timeout, env=env).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=True, timeout=600)
        subprocess.run(install, capture_output=True, check=True, timeout=timeout, env=env)


def require(name: str) -> str:
    """Program `name` from Debian's package of the same name, installed if missing."""
    ensure({name: name})
    found = binary(name)
    if found is None:
        raise RuntimeError(f"{name} is not on {SYSTEM_PATH} after installing it")
    return str(Path(found))
