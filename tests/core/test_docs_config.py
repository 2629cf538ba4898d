"""Every configuration key a document names exists in config.py's schema.

What counts as naming a key (the forms the docs use):

- inline code `section.key`, `section.key = value` or `cfg.section.key`, for a schema
  section, unless it names code: a file (`states.py`) or a module (`bootinfo.ipxe`);
- `--set section.key=value`, inline or in a code block;
- `key = value` lines under a `[section]` header in a fenced code block;
- inline `key = value` in a document about one section (docs/dhcp.md: `[dhcp]`).

A paragraph (with the one after it) that calls a key new, proposed or missing from the
schema fails too when the schema has it: that is how the docs drifted before.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from bootherd.config import SCHEMA

REPO = Path(__file__).resolve().parents[2]
KEYS = {section: {k.name for k in keys} for section, (_, keys) in SCHEMA.items()}
SECTIONS = "|".join(sorted(KEYS))

_SPAN = re.compile(r"`([^`\n]+)`")
_DOTTED = re.compile(rf"(?<![\w./-])(?:cfg\.)?({SECTIONS})\.([a-z_][a-z0-9_]*)(?![\w.(/-])")
_SET = re.compile(rf"--set[ =]({SECTIONS})\.([a-z_][a-z0-9_]*)=")
_BARE = re.compile(r"^([a-z_][a-z0-9_]*) = \S")
_FENCE = re.compile(r"^```.*?$(.*?)^```", re.S | re.M)
_HEADER = re.compile(r"^\[([a-z_]+)\]\s*(?:#.*)?$")
_MISSING = re.compile(r"not (?:yet )?in the schema|proposed key|a new key|schema gains|"
                      r"until `?config\.py`? has|getattr\(cfg", re.I)


def _code_names() -> set[str]:
    """Names that look like section.key but are code: files and modules of the repo."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    names = {Path(f).name for f in files}
    for f in files:
        p = Path(f)
        if p.parts[:2] == ("src", "bootherd") and p.suffix in (".py", ".c"):
            mod = p.with_suffix("").parts[2:]
            names.update(".".join(mod[i:i + 2]) for i in range(len(mod) - 1))
    return names


CODE = _code_names()


def named_keys(text: str, home: str | None = None) -> list[tuple[str, str, str]]:
    """(section, key, the text naming it) for every configuration key the text names."""
    out: list[tuple[str, str, str]] = []
    fences = [m.group(1) for m in _FENCE.finditer(text)]
    prose = _FENCE.sub("", text)
    for m in _SPAN.finditer(prose):
        span = m.group(1)
        for k in _DOTTED.finditer(span):
            section, key = k.groups()
            if key in KEYS[section] or f"{section}.{key}" not in CODE:
                out.append((section, key, span))
        bare = _BARE.match(span)
        if bare and home is not None:
            out.append((home, bare.group(1), span))
    for k in _SET.finditer(text):
        out.append((k.group(1), k.group(2), k.group(0)))
    for block in fences:
        section = None
        for line in block.splitlines():
            line = line.strip()
            if line.startswith("[["):  # an array of tables: a testbed file, not configuration
                section = None
                continue
            header = _HEADER.match(line)
            if header:
                section = header.group(1)
                if section not in KEYS:
                    out.append((section, "", line))
                continue
            bare = _BARE.match(line)
            if bare and section in KEYS:
                out.append((section, bare.group(1), line))
    return out


def _docs() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _home(doc: Path) -> str | None:
    return doc.stem if doc.stem in KEYS else None


@pytest.mark.parametrize("doc", _docs(), ids=lambda p: p.name)
def test_every_key_a_doc_names_is_in_the_schema(doc: Path) -> None:
    wrong = [f"{s}.{k}" + (f" ({where!r})" if where != f"{s}.{k}" else "")
             for s, k, where in named_keys(doc.read_text(), _home(doc))
             if k not in KEYS.get(s, set())]
    assert not wrong, f"{doc.name} names configuration keys the schema lacks: {wrong}"


@pytest.mark.parametrize("doc", _docs(), ids=lambda p: p.name)
def test_no_doc_calls_a_schema_key_missing(doc: Path) -> None:
    stale = []
    paras = re.split(r"\n\s*\n", doc.read_text())
    for i, para in enumerate(paras):
        if _MISSING.search(para):
            para = "\n".join(paras[i:i + 2])  # a claim often introduces the list after it
            found = [f"{s}.{k}" for s, k, _ in named_keys(para, _home(doc))
                     if k in KEYS.get(s, set())]
            found += [f"{_home(doc)}.{k}" for k in re.findall(r"`([a-z_]+)`", para)
                      if k in KEYS.get(_home(doc) or "", set())]
            if found:
                stale.append((para.strip().splitlines()[0], found))
    assert not stale, f"{doc.name} says these keys are not in the schema, but they are: {stale}"


def test_the_extraction_sees_each_form() -> None:
    text = """
Set `dhcp.mode = "proxy"`, or `tftp.nosuch`, read as `cfg.http.port`; the module
`bootinfo.ipxe`, the file `states.py`, `bootherd.tftp.core` and `tftp.core.ReadTransfer`
are code, and `net.core.rmem_max` is no section of ours.  `lease_time = 60` here.

```sh
bootherd serve --set tmcd.port=7000 --set=log.colour=red
```

```toml
[tftp]
max_upload = 1   # no such key
root = "x"

[[nodes]]
node_id = "pc1"

[dhpc]
port = 1
```
"""
    got = {(s, k) for s, k, _ in named_keys(text, home="dhcp")}
    assert got == {("dhcp", "mode"), ("tftp", "nosuch"), ("http", "port"), ("dhcp", "lease_time"),
                   ("tmcd", "port"), ("log", "colour"), ("tftp", "max_upload"), ("tftp", "root"),
                   ("dhpc", "")}
