"""Boot loaders the distribution installs, served under their conventional names.

With `tftp.system_loaders` on (the default), a name below that the TFTP root does not
hold is answered from the file Debian's package installed, over TFTP and over HTTP
(`/boot/<name>`, the URL UEFI HTTP boot clients get).  So bootherd's built-in defaults
(`undionly.kpxe`, `snponly.efi`, `ipxe.efi`: firmware.DEFAULT_LOADERS) work on a
machine with the packages and an empty root, and the Secure Boot chain needs no
copying either: shim (`shimx64.efi`, signed by the UEFI CA) asks for `grubx64.efi`
in its own folder, and gets Debian's signed GRUB network image.  A file of the same
name in the root always wins.
"""

from __future__ import annotations

import os
from pathlib import Path

# name in the root -> (installed file, Debian package that installs it)
SYSTEM_LOADERS: dict[str, tuple[str, str]] = {
    "undionly.kpxe": ("/usr/lib/ipxe/undionly.kpxe", "ipxe"),
    "snponly.efi": ("/usr/lib/ipxe/snponly.efi", "ipxe"),
    "ipxe.efi": ("/usr/lib/ipxe/ipxe.efi", "ipxe"),
    "shimx64.efi": ("/usr/lib/shim/shimx64.efi.signed", "shim-signed"),
    "mmx64.efi": ("/usr/lib/shim/mmx64.efi.signed", "shim-signed"),
    "grubx64.efi": ("/usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed",
                    "grub-efi-amd64-signed"),
    "shimaa64.efi": ("/usr/lib/shim/shimaa64.efi.signed", "shim-signed:arm64"),
    "grubaa64.efi": ("/usr/lib/grub/arm64-efi-signed/grubnetaa64.efi.signed",
                     "grub-efi-arm64-signed:arm64"),
}


class SystemLoaders:
    """Looks names up in SYSTEM_LOADERS, for one root; contents cached while unchanged."""

    def __init__(self, root: Path, enabled: bool = True,
                 table: dict[str, tuple[str, str]] = SYSTEM_LOADERS):
        self.root = Path(root)
        self.enabled = enabled
        self.table = table
        self._cache: dict[str, tuple[tuple[int, int], bytes]] = {}

    def path(self, name: str) -> Path | None:
        """The installed file answering `name`, or None (not a system loader's name, a
        file of that name in the root, the package not installed, or switched off)."""
        if not self.enabled or name not in self.table:
            return None
        if os.path.lexists(self.root / name):
            return None
        # Debian links some of them elsewhere (/usr/lib/ipxe/ipxe.efi -> /boot/ipxe.efi):
        # the real file, so HTTP serves it from its own folder.
        src = Path(self.table[name][0]).resolve()
        return src if src.is_file() else None

    def read(self, name: str) -> bytes | None:
        src = self.path(name)
        if src is None:
            return None
        st = src.stat()
        key = (st.st_mtime_ns, st.st_size)
        hit = self._cache.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        data = src.read_bytes()
        self._cache[name] = (key, data)
        return data
