"""Root confinement (bootherd.fileroot): the one rule TFTP and HTTP serve files by."""

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bootherd.fileroot import Refused, confine


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    (r / "sub").mkdir(parents=True)
    (r / "sub" / "f").write_bytes(b"x")
    (tmp_path / "secret").write_bytes(b"outside")
    (r / "out").symlink_to(tmp_path / "secret")
    (r / "sub" / "up").symlink_to("../../secret")
    (r / "in").symlink_to("sub/f")
    (r / "self").symlink_to(".")
    return os.path.realpath(r)


@pytest.mark.parametrize("name, want", [
    ("sub/f", "sub/f"), ("sub//f", "sub/f"), ("in", "sub/f"), ("sub/", "sub"),
    ("self", ""), ("missing/x", "missing/x"),
])  # fmt: skip
def test_plain_names_inside_the_root(root, name, want):
    assert confine(root, name) == os.path.join(root, want).rstrip("/")


@pytest.mark.parametrize("name", [
    "../secret", "sub/../../secret", "sub/../sub/f", "./sub/f", "sub/./f", "/etc/passwd",
    "/sub/f", "sub\\f", "a\0b", "out", "sub/up",
])  # fmt: skip
def test_refused(root, name):
    with pytest.raises(Refused):
        confine(root, name)


def test_empty_name_is_no_file(root):
    for name in ("", "//"):
        with pytest.raises(Refused if name else FileNotFoundError):
            confine(root, name)


@given(st.lists(st.sampled_from(["sub", "f", "..", ".", "", "out", "up", "in", "self", "x\0",
                                 "a\\b", "/"]), max_size=6))  # fmt: skip
@settings(max_examples=500, deadline=None)
def test_never_outside_the_root(tmp_path_factory, parts):
    base = tmp_path_factory.getbasetemp() / "fuzzroot"
    if not base.exists():
        (base / "root" / "sub").mkdir(parents=True)
        (base / "secret").write_bytes(b"outside")
        (base / "root" / "out").symlink_to(base / "secret")
        (base / "root" / "sub" / "up").symlink_to("../../secret")
    root = os.path.realpath(base / "root")
    try:
        real = confine(root, "/".join(parts))
    except (Refused, FileNotFoundError):
        return
    assert real == root or real.startswith(root + os.sep)
