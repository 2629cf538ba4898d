"""`bootherd image ...`: create, list, show, verify, delete and receive disk images."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any


def _store(args: argparse.Namespace, config: Callable, engine: Callable) -> Any:
    from .store import ImageStore

    cfg = config(args)
    return ImageStore(cfg.path(cfg.imaging.root), engine(args)), cfg


def _bar(label: str, quiet: bool) -> Callable[[int, int], None] | None:
    if quiet or not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        end = "\n" if done == total else "\r"
        print(f"{label}: {done}/{total} chunks", end=end, file=sys.stderr, flush=True)
    return show


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def cmd_create(args: argparse.Namespace, config: Callable, engine: Callable) -> int:
    store, cfg = _store(args, config, engine)
    chunk = args.chunk_size or cfg.imaging.chunk_size
    level = args.level or cfg.imaging.compression_level
    info = store.create(args.source, args.output, chunk_size=chunk, level=level,
                        fs_aware=not args.no_fs, replace=args.replace,
                        progress=_bar("reading", args.quiet))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    kinds = info["chunk_kinds"]
    print(f"image {info['name']}: {_mib(info['disk_size'])} disk -> {_mib(info['file_size'])} "
          f"({100 * info['ratio']:.1f}%), {info['chunks']} chunks "
          f"({kinds['zstd']} zstd, {kinds['raw']} raw, {kinds['skipped']} skipped), "
          f"sha256 {info['sha256']}")
    if info["notes"]:
        print(f"  {info['notes']}")
    print(f"  {info['path']}")
    return 0


def cmd_list(args: argparse.Namespace, config: Callable, engine: Callable) -> int:
    from ..cli import _emit, _since

    store, _ = _store(args, config, engine)
    rows = store.list()
    for r in rows:
        r["disk"] = _mib(r["disk_size"])
        r["file"] = _mib(r["file_size"])
        r["made"] = _since(r["created"])
        r["sha256_"] = r["sha256"][:16]
    _emit(args, rows, ["name", "disk", "file", "chunks", "fs_aware", "made", "present",
                       "sha256_"], f"{len(rows)} disk images")
    return 0


def cmd_show(args: argparse.Namespace, config: Callable, engine: Callable) -> int:
    store, _ = _store(args, config, engine)
    print(json.dumps(store.show(args.name), indent=2, default=str))
    return 0


def cmd_verify(args: argparse.Namespace, config: Callable, engine: Callable) -> int:
    from .format import ImageError

    store, _ = _store(args, config, engine)
    try:
        info = store.verify(args.name, _bar("verifying", args.quiet))
    except ImageError as e:
        print(f"bootherd: image {args.name}: FAILED: {e}", file=sys.stderr)
        return 1
    print(f"image {args.name}: OK ({info['chunks']} chunks, sha256 {info['sha256']})")
    return 0


def cmd_delete(args: argparse.Namespace, config: Callable, engine: Callable) -> int:
    store, _ = _store(args, config, engine)
    store.delete(args.name, force=args.force)
    print(f"image {args.name} deleted")
    return 0


def cmd_receive(args: argparse.Namespace, config: Callable, engine: Callable) -> int:
    from . import receiver as rc
    from .transport import ReceiveRun, print_progress

    cfg = config(args)
    server = args.server or cfg.server.public_address
    core = rc.Receiver(args.image, multicast=not args.http_only,
                       join_attempts=args.join_attempts, data_timeout=args.data_timeout,
                       stall_timeout=args.stall_timeout)
    run = ReceiveRun(core, server=server, port=args.port or cfg.imaging.port,
                     output=args.output, http_port=args.http_port or cfg.http.port,
                     interface_address=args.interface_address or "", drop=args.drop,
                     report_url=args.report or "", verify=not args.no_verify,
                     progress=None if args.quiet else print_progress())
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    res = runner(run.run(args.timeout or None))
    st = res.stats
    line = (f"{'OK' if res.ok else 'FAILED'}: {res.message}; {res.seconds:.2f} s via {res.via}; "
            f"datagrams {st.datagrams} (useful {st.useful}, duplicate {st.duplicates}, "
            f"malformed {st.malformed}, foreign {st.foreign}), bad chunks {st.bad_chunks}, "
            f"requests {st.requests}, http chunks {st.http_chunks}")
    if res.sha256:
        line += f"; sha256 {res.sha256}"
    if args.json:
        print(json.dumps({"ok": res.ok, "message": res.message, "via": res.via,
                          "fallback_reason": core.fallback_reason, "seconds": res.seconds,
                          "sha256": res.sha256, **vars(st)}))
    else:
        print(line, file=sys.stdout if res.ok else sys.stderr)
    return 0 if res.ok else 1


def add_parser(sub: Any, common: Callable[..., None], config: Callable, engine: Callable) -> None:
    img = sub.add_parser("image", help="disk images and multicast receiving").add_subparsers(
        dest="sub", required=True)

    def bind(fn: Callable) -> Callable[[argparse.Namespace], int]:
        return lambda args: fn(args, config, engine)

    p = img.add_parser("create", help="make an image from a raw disk, block device or qcow2")
    common(p, json_flag=True)
    p.add_argument("source", help="raw disk file, block device, or qcow2 (through qemu-img)")
    p.add_argument("-o", "--output", required=True, metavar="NAME", help="image name")
    p.add_argument("--chunk-size", type=int, help="bytes per chunk (imaging.chunk_size)")
    p.add_argument("--level", type=int, help="zstd level (imaging.compression_level)")
    p.add_argument("--no-fs", action="store_true",
                   help="do not ask e2fsprogs for unused blocks (skip zero chunks only)")
    p.add_argument("--replace", action="store_true", help="replace an image of that name")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(fn=bind(cmd_create))
    p = img.add_parser("list", help="images under imaging.root")
    common(p, json_flag=True)
    p.set_defaults(fn=bind(cmd_list))
    p = img.add_parser("show", help="one image, its chunks and the OS images using it")
    common(p)
    p.add_argument("name")
    p.set_defaults(fn=bind(cmd_show))
    p = img.add_parser("verify", help="check every digest of an image")
    common(p)
    p.add_argument("name")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(fn=bind(cmd_verify))
    p = img.add_parser("delete", help="remove an image (file and inventory row)")
    common(p)
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="even if an OS image names it")
    p.set_defaults(fn=bind(cmd_delete))
    p = img.add_parser("receive", help="receive an image over multicast (HTTP fallback)")
    common(p, json_flag=True)
    p.add_argument("--image", required=True)
    p.add_argument("-o", "--output", required=True, help="file or block device to write")
    p.add_argument("--server", help="imaging server address (server.public_address)")
    p.add_argument("--port", type=int, help="its control port (imaging.port)")
    p.add_argument("--http-port", type=int, help="its HTTP port for the fallback (http.port)")
    p.add_argument("--interface-address", help="local address to receive multicast on")
    p.add_argument("--http-only", action="store_true", help="skip multicast, fetch over HTTP")
    p.add_argument("--join-attempts", type=int, default=10)
    p.add_argument("--data-timeout", type=float, default=3.0,
                   help="seconds after joining without any multicast datagram before "
                        "falling back to HTTP")
    p.add_argument("--stall-timeout", type=float, default=15.0,
                   help="seconds without progress before falling back to HTTP")
    p.add_argument("--drop", type=float, default=0.0,
                   help="drop this fraction of multicast datagrams (loss injection)")
    p.add_argument("--report", metavar="URL",
                   help="POST progress as JSON here, e.g. http://SERVER:8080/images/NAME/progress")
    p.add_argument("--timeout", type=float, default=0.0, help="give up after this many seconds")
    p.add_argument("--no-verify", action="store_true", help="skip the final SHA-256 read-back")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(fn=bind(cmd_receive))
