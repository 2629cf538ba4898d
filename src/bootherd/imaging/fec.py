"""Erasure coding for multicast chunks: a systematic Cauchy Reed-Solomon code over GF(2^8).

A chunk's stored bytes are cut into blocks of ``BLOCK`` bytes (the last one padded with
zeros for coding, sent short).  Blocks are dealt round-robin into stripes of at most
``K_MAX`` source symbols; each stripe has up to ``R_MAX`` repair symbols.  Any ``k``
distinct symbols of a stripe of ``k`` sources (sources and repairs in any mix) give the
stripe back, so a repair symbol helps every receiver that lost *any* one block of the
stripe: 100 receivers each missing a different block all recover from one repair.

Repair symbol ``j`` of a stripe is ``sum_t C[j][t] * S_t`` with the Cauchy coefficients
``C[j][t] = 1 / (j XOR (R_MAX + t))``: every square sub-matrix of a Cauchy matrix is
invertible, so the code is MDS (docs/imaging.md).  Field: polynomial 0x11d, generator 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

try:
    from .._imgfec import encode as _native_encode
except ImportError:  # pragma: no cover - the extension was not built
    _native_encode = None

BLOCK = 1408  # payload bytes per datagram (1500 MTU - IP - UDP - our 16-byte header)
K_MAX = 192  # source symbols per stripe at most
R_MAX = 64  # repair symbols per stripe at most (K_MAX + R_MAX = 256 field elements)


def _tables() -> tuple[list[int], list[int]]:
    exp = [0] * 512
    log = [0] * 256
    x = 1
    for i in range(255):
        exp[i] = x
        log[x] = i
        x <<= 1
        if x & 0x100:
            x ^= 0x11D
    for i in range(255, 512):
        exp[i] = exp[i - 255]
    return exp, log


EXP, LOG = _tables()


def gf_mul(a: int, b: int) -> int:
    if a == 0 or b == 0:
        return 0
    return EXP[LOG[a] + LOG[b]]


def gf_inv(a: int) -> int:
    if a == 0:
        raise ZeroDivisionError("0 has no inverse in GF(256)")
    return EXP[255 - LOG[a]]


# MUL[a, b] = a * b; a row gathers a whole symbol's product at once.
MUL = np.array([[gf_mul(a, b) for b in range(256)] for a in range(256)], dtype=np.uint8)
# COEF[j, t] = C[j][t]
COEF = np.array([[gf_inv(j ^ (R_MAX + t)) for t in range(K_MAX)] for j in range(R_MAX)],
                dtype=np.uint8)


@dataclass(frozen=True, slots=True)
class Layout:
    """How one chunk's stored bytes map to blocks and stripes."""

    stored_len: int
    blocks: int
    stripes: int

    def stripe_of(self, block: int) -> tuple[int, int]:
        """(stripe, index in stripe) of a source block."""
        return block % self.stripes, block // self.stripes

    def block_of(self, stripe: int, t: int) -> int:
        return t * self.stripes + stripe

    def k(self, stripe: int) -> int:
        """Source symbols in a stripe."""
        return (self.blocks - stripe + self.stripes - 1) // self.stripes

    def block_len(self, block: int) -> int:
        if block == self.blocks - 1:
            return self.stored_len - block * BLOCK
        return BLOCK


def layout(stored_len: int) -> Layout:
    blocks = max(1, -(-stored_len // BLOCK))
    return Layout(stored_len, blocks, -(-blocks // K_MAX))


def stripe_matrix(data: bytes | memoryview, lay: Layout, stripe: int) -> np.ndarray:
    """The stripe's source symbols as a (k, BLOCK) array, the last block zero-padded."""
    k = lay.k(stripe)
    out = np.zeros((k, BLOCK), dtype=np.uint8)
    buf = np.frombuffer(data, dtype=np.uint8)
    for t in range(k):
        b = lay.block_of(stripe, t)
        piece = buf[b * BLOCK:(b + 1) * BLOCK]
        out[t, :len(piece)] = piece
    return out


def encode(sources: np.ndarray, repairs: list[int]) -> np.ndarray:
    """Repair symbols ``repairs`` (indices 0..R_MAX-1) of a (k, BLOCK) source array."""
    k = sources.shape[0]
    coef = COEF[np.asarray(repairs, dtype=np.intp)][:, :k]  # (m, k)
    return np.bitwise_xor.reduce(MUL[coef[:, :, None], sources[None, :, :]], axis=1)


def encode_stripe(stored: bytes, lay: Layout, stripe: int, repairs: list[int]) -> list[bytes]:
    """Repair symbols of one stripe of a chunk's stored bytes (native when built)."""
    if _native_encode is not None:
        return _native_encode(stored, lay.stripes, stripe, repairs)
    return [r.tobytes() for r in encode(stripe_matrix(stored, lay, stripe), repairs)]


def _invert(m: list[list[int]]) -> list[list[int]]:
    """Gauss-Jordan inverse of a square matrix over GF(256)."""
    n = len(m)
    a = [row[:] + [1 if i == j else 0 for j in range(n)] for i, row in enumerate(m)]
    for col in range(n):
        piv = next((r for r in range(col, n) if a[r][col]), None)
        if piv is None:
            raise ValueError("singular matrix")  # impossible for a Cauchy sub-matrix
        a[col], a[piv] = a[piv], a[col]
        inv = gf_inv(a[col][col])
        a[col] = [gf_mul(inv, v) for v in a[col]]
        for r in range(n):
            f = a[r][col]
            if r != col and f:
                pr = a[col]
                a[r] = [v ^ gf_mul(f, p) for v, p in zip(a[r], pr, strict=True)]
    return [row[n:] for row in a]


def decode(k: int, sources: dict[int, bytes], repairs: dict[int, bytes]) -> list[bytes]:
    """All k source symbols (BLOCK bytes each, padded) from any k distinct symbols.

    ``sources`` maps index in stripe -> symbol, ``repairs`` repair index -> symbol.
    Raises ValueError with fewer than k symbols."""
    missing = [t for t in range(k) if t not in sources]
    if not missing:
        return [_pad(sources[t]) for t in range(k)]
    use = sorted(repairs)[:len(missing)]
    if len(use) < len(missing):
        raise ValueError(f"stripe needs {len(missing)} more symbols, has {len(use)} repairs")
    present = [t for t in range(k) if t in sources]
    rhs = np.stack([np.frombuffer(_pad(repairs[j]), dtype=np.uint8) for j in use])
    if present:
        src = np.stack([np.frombuffer(_pad(sources[t]), dtype=np.uint8) for t in present])
        coef = COEF[np.asarray(use, dtype=np.intp)][:, present]
        rhs = rhs ^ np.bitwise_xor.reduce(MUL[coef[:, :, None], src[None, :, :]], axis=1)
    a = [[int(COEF[j, t]) for t in missing] for j in use]
    ainv = np.array(_invert(a), dtype=np.uint8)
    solved = np.bitwise_xor.reduce(MUL[ainv[:, :, None], rhs[None, :, :]], axis=1)
    out = {t: _pad(s) for t, s in sources.items()}
    for i, t in enumerate(missing):
        out[t] = solved[i].tobytes()
    return [out[t] for t in range(k)]


def _pad(sym: bytes) -> bytes:
    return sym if len(sym) == BLOCK else bytes(sym) + bytes(BLOCK - len(sym))


def assemble(lay: Layout, stripes: list[list[bytes]]) -> bytes:
    """The chunk's stored bytes from its decoded stripes."""
    out = bytearray(lay.blocks * BLOCK)
    for s, syms in enumerate(stripes):
        for t, sym in enumerate(syms):
            b = lay.block_of(s, t)
            out[b * BLOCK:(b + 1) * BLOCK] = sym
    del out[lay.stored_len:]
    return bytes(out)
