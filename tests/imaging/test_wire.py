"""The imaging codec: every message round-trips; anything else is Malformed, and the
cores count and drop it (hypothesis)."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from bootherd.imaging import fec, wire
from bootherd.imaging import receiver as rc
from bootherd.imaging import sessions as sv

u32 = st.integers(0, 2**32 - 1)
name = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,40}", fullmatch=True)

messages = st.one_of(
    st.builds(wire.Join, u32, u32, name),
    st.builds(wire.Joined, u32, u32, st.just("239.1.2.3"), st.integers(0, 65535),
              st.integers(0, 65535), u32, u32, st.integers(0, 65535), st.integers(0, 65535),
              st.integers(0, 2**64 - 1), u32, st.binary(min_size=32, max_size=32),
              st.binary(min_size=32, max_size=32), name),
    st.builds(wire.Refused, u32, st.integers(0, 255), st.text(max_size=60)),
    st.builds(wire.Request, u32, u32, u32, u32,
              st.lists(st.tuples(u32, u32), max_size=wire.MAX_RANGES).map(tuple),
              st.lists(st.tuples(u32, st.integers(0, 65535), st.integers(0, 255)),
                       max_size=wire.MAX_NEEDS).map(tuple),
              st.none() | st.builds(wire.Feedback, u32, u32, st.integers(0, 100))),
    st.builds(wire.Data, u32, u32, u32, st.integers(0, 65535), st.binary(min_size=1, max_size=1408)),
    st.builds(wire.Leave, u32, u32, st.integers(0, 255), u32),
)


@given(messages)
def test_round_trip(m: wire.Message) -> None:
    data = wire.encode(m)
    assert len(data) <= 4 + 20 + wire.MAX_RANGES * 8 + wire.MAX_NEEDS * 7 + 9 or isinstance(m, wire.Joined)
    back = wire.decode(data)
    if isinstance(m, wire.Data):
        assert (back.session, back.chunk, back.seq, back.symbol, bytes(back.payload)) == \
               (m.session, m.chunk, m.seq, m.symbol, bytes(m.payload))
    else:
        assert back == m


@given(st.binary(max_size=1600))
@settings(max_examples=400)
def test_garbage_is_malformed_or_a_message(data: bytes) -> None:
    try:
        wire.decode(data)
    except wire.Malformed:
        pass


@given(messages, st.integers(0, 200), st.integers(0, 255))
@settings(max_examples=300)
def test_mutated_messages_never_escape_the_codec(m: wire.Message, pos: int, flip: int) -> None:
    data = bytearray(wire.encode(m))
    if data:
        data[pos % len(data)] ^= flip
    cut = bytes(data[:pos]) if pos % 3 == 0 else bytes(data)
    try:
        wire.decode(cut)
    except wire.Malformed:
        pass


class _Source:
    def __init__(self) -> None:
        from bootherd.imaging.format import Chunk, Header
        self.header = Header(1, 0, 196, 1 << 20, 1, 1 << 20, 100, 0, b"\0" * 32, b"\0" * 32,
                             (Chunk(0, 196, 100, 1 << 20, 1, b"\0" * 32),), b"\0" * 32)

    def read(self, c: int) -> bytes:
        return b"x" * 100


@given(st.lists(st.one_of(st.binary(max_size=300), messages.map(wire.encode)), max_size=30))
@settings(max_examples=200)
def test_cores_count_and_drop_anything(datagrams: list[bytes]) -> None:
    counters: Counter = Counter()
    server = sv.Server(group="239.1.1.1", ports=range(5000, 5002), counters=counters)
    server.opened(0.0, "img", None)
    r = rc.Receiver("img", receiver_id=1)
    r.start(0.0)
    for i, d in enumerate(datagrams):
        for e in server.datagram(float(i), ("10.0.0.2", 999), d):
            if isinstance(e, sv.OpenImage):
                server.opened(float(i), e.image, _Source())
        server.poll(float(i))
        r.control(float(i), d)
        r.data(float(i), d)
        r.poll(float(i))
    assert counters["malformed"] + counters["joins"] + counters["requests"] + \
        counters["unknown_session"] + counters["unexpected"] + counters["leaves"] <= len(datagrams)


def test_fec_any_k_symbols_decode_the_stripe() -> None:
    import random
    rng = random.Random(3)
    data = rng.randbytes(fec.BLOCK * 150 - 77)
    lay = fec.layout(len(data))
    assert lay.stripes == 1 and lay.k(0) == 150
    S = fec.stripe_matrix(data, lay, 0)
    reps = fec.encode(S, list(range(12)))
    for trial in range(5):
        lost = set(rng.sample(range(150), 12))
        sources = {t: S[t].tobytes() for t in range(150) if t not in lost}
        pick = rng.sample(range(12), 12)
        repairs = {j: reps[j].tobytes() for j in pick}
        got = fec.decode(150, sources, repairs)
        assert fec.assemble(lay, [got]) == data, trial


def test_native_repair_symbols_are_the_reference_ones() -> None:
    import os
    import random

    if fec._native_encode is None:
        if os.environ.get("CI"):
            raise AssertionError("bootherd._imgfec was not built (gcc and python3-dev?)")
        return
    rng = random.Random(9)
    for size in (1, 1407, 1408, 1409, 300_000, 1 << 20):
        data = rng.randbytes(size)
        lay = fec.layout(size)
        for stripe in range(lay.stripes):
            reps = rng.sample(range(fec.R_MAX), 5)
            want = [r.tobytes() for r in fec.encode(fec.stripe_matrix(data, lay, stripe), reps)]
            assert fec._native_encode(data, lay.stripes, stripe, reps) == want, (size, stripe)
