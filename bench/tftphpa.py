"""tftp-hpa's in.tftpd for the benchmarks, unpacked by the bench itself.

tftpd-hpa conflicts with atftpd (which the tests install, and which ships an `in.tftpd`
of its own), so it is not installed: `apt-get download tftpd-hpa` and `dpkg -x` unpack it
into a cache folder (`$XDG_CACHE_HOME/bootherd-bench`, else `~/.cache/bootherd-bench`, or
the folder given), once.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "bootherd-bench")


def find_in_tftpd(work: str | None = None) -> str | None:
    """The path of tftp-hpa's in.tftpd, unpacked under ``work`` (default: the cache)."""
    dest = os.path.join(work or cache_dir(), "tftpd-hpa")
    path = os.path.join(dest, "usr", "sbin", "in.tftpd")
    if os.path.exists(path):
        return path
    os.makedirs(dest, exist_ok=True)
    try:
        subprocess.run(["apt-get", "download", "tftpd-hpa"], cwd=dest, check=True,
                       capture_output=True, timeout=120)  # fmt: skip
        deb = glob.glob(os.path.join(dest, "tftpd-hpa_*.deb"))[0]
        subprocess.run(["dpkg", "-x", deb, dest], check=True, timeout=60)
    except (OSError, subprocess.SubprocessError, IndexError) as exc:
        print(f"# tftpd-hpa unavailable: {exc}", file=sys.stderr)
        return None
    return path if os.path.exists(path) else None
