"""Child processes and ports for bootherd's demo, benchmarks and tests."""

from __future__ import annotations

import signal
import socket
import subprocess


def terminate(proc: subprocess.Popen, timeout: float = 15.0) -> int | None:
    """SIGTERM, wait up to `timeout`, then SIGKILL; returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both TCP and UDP on `host` (the services bind both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind((host, 0))
            port = t.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind((host, port))
                except OSError:
                    continue
            return port
    raise RuntimeError(f"no port free for both TCP and UDP on {host}")
