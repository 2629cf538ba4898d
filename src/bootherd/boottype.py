"""bootinfo's boot types: the wire values every boot answer is expressed in.

A neutral module so that codecs (bootinfo's, the storm's clients) name the
wire values without importing the boot policy.
"""

from __future__ import annotations

from enum import IntEnum


class BootType(IntEnum):
    """bootinfo's boot_what types (the wire values)."""

    PART = 1
    SYSID = 2
    MB = 3
    WAIT = 4
    REBOOT = 5
    AUTO = 6
    MFS = 7
    RESTART = 8
    DISKPART = 9


# The types a server may send unasked (an ORDER) to a loader waiting for one.
ORDER_KINDS = (BootType.AUTO, BootType.REBOOT, BootType.RESTART)


def order_kind(kind: BootType | str | int) -> BootType:
    """An order kind from its BootType, wire value or name (any case); ValueError otherwise."""
    try:
        k = BootType[kind.upper()] if isinstance(kind, str) else BootType(kind)
    except (KeyError, ValueError):
        raise ValueError(f"order must be AUTO, REBOOT or RESTART, not {kind!r}") from None
    if k not in ORDER_KINDS:
        raise ValueError(f"order must be AUTO, REBOOT or RESTART, not {k.name}")
    return k
