"""Install the Debian packages a test needs (as root, through apt-get), so that `make test` on a fresh
machine runs those tests instead of skipping them. Used by the local Slurm cluster and the
real-caption set's rasteriser."""
from __future__ import annotations

import os
import shutil
import subprocess
import time


class PackagesUnavailable(RuntimeError):
    """The binaries are missing and cannot be installed here (the reason is the message)."""


def ensure_binaries(binaries, packages, log=print) -> None:
    """Install `packages` when any of `binaries` is missing from PATH; raise PackagesUnavailable if
    that is impossible (not root, no apt-get), RuntimeError if apt-get fails."""
    if all(shutil.which(b) for b in binaries):
        return
    hint = f"apt-get install {' '.join(packages)}"
    if os.geteuid() != 0:
        raise PackagesUnavailable(f"{', '.join(binaries)} not installed and installing needs root ({hint})")
    if not shutil.which("apt-get"):
        raise PackagesUnavailable(f"{', '.join(binaries)} not installed and there is no apt-get ({hint})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    t0 = time.perf_counter()
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]):
        # Packages that ship services try to start them; without an init system policy-rc.d refuses,
        # which is harmless: the tests run any daemon themselves.
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    missing = [b for b in binaries if not shutil.which(b)]
    if missing:
        raise RuntimeError(f"installed {', '.join(packages)} but {', '.join(missing)} still not on PATH")
    log(f"installed {' '.join(packages)} in {time.perf_counter() - t0:.1f} s")
