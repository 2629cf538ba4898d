"""Root confinement: the one rule by which TFTP and HTTP turn a requested name into a file.

A name is relative to its root and made of plain components: no NUL, no backslash, no
leading ``/``, no ``.`` or ``..`` component (empty components between slashes are
skipped).  Symlinks are followed, and a real path outside the root is refused, so a link
can point anywhere inside the root but never out of it.  Each protocol first turns the
spellings its clients use into such a name (TFTP: :func:`bootherd.tftp.store.tftp_name`);
nothing outside the root is ever returned, whatever the spelling.
"""

from __future__ import annotations

import os
import stat


class Refused(Exception):
    """A requested name that is not a plain relative name, or that leads out of its root."""


def confine(root: str, name: str) -> str:
    """The real path of ``name`` inside the real (already resolved) folder ``root``.

    Raises :class:`Refused`, or FileNotFoundError for an empty name.  Whether the path
    exists, and what it is, is the caller's to check."""
    if "\0" in name or "\\" in name or name.startswith("/"):
        raise Refused(name)
    parts = [p for p in name.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise Refused(name)
    if not parts:
        raise FileNotFoundError(name)
    # Under a real root, a name none of whose components is a link is its own real path:
    # one lstat per component below the root, where realpath walks from "/" (a request's
    # hot path).  A link, or a component that is missing, is left to realpath.
    path = root
    for p in parts:
        path = os.path.join(path, p)
        try:
            if stat.S_ISLNK(os.lstat(path).st_mode):
                break
        except OSError:
            break
    else:
        return path
    real = os.path.realpath(os.path.join(root, *parts))
    inside = root if root.endswith(os.sep) else root + os.sep
    if real != root and not real.startswith(inside):  # a link that leads out of the root
        raise Refused(name)
    return real
