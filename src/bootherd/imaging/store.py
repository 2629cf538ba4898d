"""Disk images on disk and in the inventory: create, list, show, verify, delete.

The files live under ``imaging.root`` as ``NAME.bhimg``; the ``disk_images`` table
records each one (size, digest, how it was made) so operators and the reload cycle
find them, and ``os_images.disk_image`` names the image an OS is loaded from.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, delete, insert, select

from ..inventory import schema as s
from ..inventory.ops import Conflict
from ..inventory.testbed import DISK_IMAGE_NAME
from . import format as fmt
from . import source as src

SUFFIX = ".bhimg"


class ImageNotFound(LookupError):
    pass


class ImageExists(Conflict):  # a failure, not a usage error (README: exit codes)
    pass


class ImageUnusable(Conflict):
    """Recorded, but its file is missing, damaged or not the one recorded."""


def check_name(name: str) -> str:
    if not DISK_IMAGE_NAME.fullmatch(name):
        raise ValueError(f"{name!r}: an image name is 1-128 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return name


class ImageStore:
    def __init__(self, root: str | os.PathLike, engine: Engine):
        self.root = Path(root)
        self.engine = engine

    def path(self, name: str) -> Path:
        return self.root / (check_name(name) + SUFFIX)

    def create(self, source: str, name: str, *, chunk_size: int = fmt.DEFAULT_CHUNK,
               level: int = 3, fs_aware: bool = True, replace: bool = False,
               progress: Any = None) -> dict[str, Any]:
        check_name(name)
        with self.engine.connect() as conn:
            exists = conn.execute(select(s.disk_images.c.name)
                                  .where(s.disk_images.c.name == name)).first()
        if exists and not replace:
            raise ImageExists(f"image {name!r} exists (use --replace)")
        self.root.mkdir(parents=True, exist_ok=True)
        out = self.path(name)
        with src.open_source(source, scratch=self.root) as disk:
            unused = src.unused_ranges(disk) if fs_aware else []
            if not fs_aware:
                disk.notes.append("filesystem awareness off: zero chunks skipped only")
            header = fmt.create(disk.read_at, disk.size, out, chunk_size=chunk_size,
                                level=level, unused=unused, progress=progress)
            notes = "; ".join(disk.notes)
            kind = disk.kind
        row = {"name": name, "file": out.name, "disk_size": header.disk_size,
               "file_size": header.file_size, "chunk_size": header.chunk_size,
               "chunks": header.chunk_count, "sha256": header.image_sha256.hex(),
               "fs_aware": header.fs_aware, "source": f"{kind}:{os.path.abspath(source)}",
               "notes": notes, "created": time.time()}
        with self.engine.begin() as conn:
            conn.execute(delete(s.disk_images).where(s.disk_images.c.name == name))
            conn.execute(insert(s.disk_images).values(**row))
        return self._describe(row, header)

    def _row(self, name: str) -> dict[str, Any]:
        with self.engine.connect() as conn:
            r = conn.execute(select(s.disk_images).where(s.disk_images.c.name == name)).mappings().first()
        if r is None:
            raise ImageNotFound(f"no disk image {name!r} (bootherd image list)")
        return dict(r)

    def _describe(self, row: dict[str, Any], header: fmt.Header | None = None) -> dict[str, Any]:
        out = dict(row)
        out["path"] = str(self.root / row["file"])
        out["ratio"] = round(row["file_size"] / row["disk_size"], 4) if row["disk_size"] else 0
        if header is not None:
            out["chunk_kinds"] = header.summary()["chunk_kinds"]
        return out

    def list(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(s.disk_images).order_by(s.disk_images.c.name)).mappings().all()
        out = []
        for r in rows:
            d = self._describe(dict(r))
            d["present"] = (self.root / r["file"]).is_file()
            out.append(d)
        return out

    def used_by(self, name: str) -> list[str]:
        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(select(s.os_images.c.name)
                                               .where(s.os_images.c.disk_image == name)
                                               .order_by(s.os_images.c.name))]

    def show(self, name: str) -> dict[str, Any]:
        row = self._row(check_name(name))
        path = self.root / row["file"]
        try:
            header = fmt.read_header(path)
            out = self._describe(row, header)
            out["state"] = "ok" if header.image_sha256.hex() == row["sha256"] else \
                "file does not match the inventory (replaced outside bootherd?)"
        except FileNotFoundError:
            out = self._describe(row)
            out["state"] = "file missing"
        except fmt.ImageError as e:
            out = self._describe(row)
            out["state"] = f"damaged: {e}"
        out["os_images"] = self.used_by(name)
        return out

    def reloadable(self, name: str) -> dict[str, Any]:
        """The image as `show` gives it, if a reload may write it (the admin API's and
        the console's reload both ask here).  ImageNotFound, ValueError (a bad name),
        ImageUnusable (its file is missing or damaged)."""
        info = self.show(name)
        if info.get("state") != "ok":
            raise ImageUnusable(f"image {name}: {info.get('state')}")
        return info

    def verify(self, name: str, progress: Any = None) -> dict[str, Any]:
        """Every digest checked; raises ImageError naming what is wrong."""
        row = self._row(check_name(name))
        path = self.root / row["file"]
        if not path.is_file():
            raise fmt.ImageError(f"{path}: file missing")
        header = fmt.verify(path, progress)
        if header.image_sha256.hex() != row["sha256"]:
            raise fmt.ImageError(f"{path}: intact, but not the image the inventory records "
                                 f"(SHA-256 {header.image_sha256.hex()}, expected {row['sha256']})")
        return self._describe(row, header)

    def delete(self, name: str, force: bool = False) -> None:
        row = self._row(check_name(name))
        users = self.used_by(name)
        if users and not force:
            raise Conflict(f"image {name!r} is used by OS image(s) {', '.join(users)} "
                             "(--force deletes it anyway)")
        with self.engine.begin() as conn:
            conn.execute(delete(s.disk_images).where(s.disk_images.c.name == name))
        (self.root / row["file"]).unlink(missing_ok=True)

    def open(self, name: str) -> tuple[Path, fmt.Header]:
        """Path and checked header of a registered image (what a session serves)."""
        row = self._row(check_name(name))
        path = self.root / row["file"]
        if not path.is_file():
            raise ImageNotFound(f"image {name!r}: file {path} missing")
        header = fmt.read_header(path)
        if header.image_sha256.hex() != row["sha256"]:
            raise fmt.ImageError(f"{path} is not the image the inventory records")
        return path, header
