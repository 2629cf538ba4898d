"""Real TFTP clients (Debian packages) against a live server on 127.0.0.1."""

import asyncio
import shutil

import pytest

from .conftest import sha


def need(binary):
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} not installed (Debian package needed for this client test)")
    return path


async def run(*argv, timeout=60):
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode(errors="replace") + err.decode(errors="replace")


def commands(port, out):
    p = str(port)
    return {
        "tftp-hpa": ("tftp", ["-m", "binary", "127.0.0.1", p, "-c", "get", "f1m", out]),
        "atftp": ("atftp", ["--option", "blksize 1456", "--option", "tsize 0",
                            "--option", "windowsize 8", "-g", "-r", "f1m", "-l", out,
                            "127.0.0.1", p]),
        "curl": ("curl", ["-sS", "-o", out, f"tftp://127.0.0.1:{p}/f1m"]),
        "curl-blksize": ("curl", ["-sS", "--tftp-blksize", "1456", "-o", out,
                                  f"tftp://127.0.0.1:{p}/f1m"]),
        "busybox": ("busybox", ["tftp", "-g", "-b", "1456", "-r", "f1m", "-l", out,
                                "127.0.0.1", p]),
    }  # fmt: skip


@pytest.mark.parametrize("client", ["tftp-hpa", "atftp", "curl", "curl-blksize", "busybox"])
async def test_real_client_fetch(server, root, tmp_path, client):
    out = str(tmp_path / "out")
    binary, args = commands(server.port, out)[client]
    rc, text = await run(need(binary), *args)
    assert rc == 0, text
    with open(out, "rb") as f:
        assert sha(f.read()) == sha((root / "f1m").read_bytes())
    await asyncio.sleep(0.05)
    assert server.counters.transfers_ok == 1 and server.counters.transfers_failed == 0


async def test_real_client_not_found(server, tmp_path):
    rc, text = await run(need("curl"), "-sS", "-o", str(tmp_path / "x"),
                         f"tftp://127.0.0.1:{server.port}/missing")  # fmt: skip
    assert rc == 68, text  # CURLE_TFTP_NOTFOUND: the server answered ERROR 1
