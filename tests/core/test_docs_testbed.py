"""docs/testbed.md documents the testbed file as the parser reads it: every section and
every field, in order, with its type and default; a field it calls required is refused
when missing, one it calls optional is not."""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path

import pytest

from bootherd.inventory.testbed import (
    EXP_CHILDREN,
    NODE_CHILDREN,
    POWER_FIELDS,
    TOP,
    Field,
    TestbedError,
    generate,
    parse,
    validate,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "testbed.md"
SECTIONS: dict[str, list[Field]] = {
    **TOP,
    **{f"nodes.{k}": v for k, v in NODE_CHILDREN.items()},
    "nodes.power": POWER_FIELDS,
    **{f"experiments.{k}": v for k, v in EXP_CHILDREN.items()},
}
TYPES = {bool: "boolean", int: "integer", float: "float", str: "string", list: "list of strings",
         dict: "table of strings"}
_HEADING = re.compile(r"^### `\[\[?([a-z_.]+)\]\]?`\s*$")
# field, type, default, required (yes, no, or "with <drivers>": required with those),
# meaning
_ROW = re.compile(r"^\| `([a-z_0-9]+)` \| ([^|]+) \| `([^`]*)` \| (yes|no|with [^|]+) \| (.+) \|\s*$")


def documented() -> dict[str, list[tuple[str, str, str, bool]]]:
    out: dict[str, list] = {}
    current = None
    for line in DOC.read_text().splitlines():
        m = _HEADING.match(line)
        if m:
            current = out.setdefault(m.group(1), [])
            continue
        m = _ROW.match(line)
        if m and current is not None:
            name, typ, default, req, meaning = m.groups()
            assert meaning.strip(), name
            current.append((name, typ.strip(), default, req != "no"))
    return out


def test_every_section_and_field_is_documented_in_order_with_type_and_default() -> None:
    doc = documented()
    assert set(doc) == set(SECTIONS)
    for section, fields in SECTIONS.items():
        rows = doc[section]
        assert [r[0] for r in rows] == [f.name for f in fields], section
        for (name, typ, default, _), f in zip(rows, fields, strict=True):
            assert typ == TYPES[type(f.default)], (section, name)
            assert tomllib.loads(f"x = {default}")["x"] == f.default, (section, name)


def _sample() -> dict:
    text = generate(8, subnet="10.77.0.0/24", bmc="ipmi")  # "with ipmi" fields: required
    doc = tomllib.loads(text)
    node = doc["nodes"][0]
    node["tunnels"] = [{"lan": "t0", "member": "m0", "key": "k", "value": "v"}]
    return doc


def _entries(doc: dict, section: str) -> list[dict]:
    top, _, child = section.partition(".")
    if not child:
        return doc[top]
    found = []
    for e in doc[top]:
        sub = e.get(child)
        found += sub if isinstance(sub, list) else [sub] if isinstance(sub, dict) else []
    return found


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_required_means_refused_when_missing_and_optional_means_not(section: str) -> None:
    base = _sample()
    validate(copy.deepcopy(base))
    assert _entries(base, section), f"the sample has no {section} entry"
    for name, _typ, _default, required in documented()[section]:
        doc = copy.deepcopy(base)
        # The last (no syncserver names it); export leaves an empty loaders map out.
        _entries(doc, section)[-1].pop(name, None)
        if required:
            with pytest.raises(TestbedError):
                validate(doc)
        else:
            validate(doc)


def test_the_example_at_the_top_imports() -> None:
    block = DOC.read_text().split("```toml\n", 1)[1].split("```", 1)[0]
    data = parse(block)
    assert data["nodes"][0]["interfaces"][0]["role"] == "ctrl"
