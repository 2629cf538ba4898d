"""Another checkout's bootherd in the same run as this one (the benches' --baseline SRC)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def env(src: str | None) -> dict[str, str] | None:
    """The environment that runs `src`'s bootherd (its src/, extensions built there);
    None (this process's environment) for this checkout's."""
    return dict(os.environ, PYTHONPATH=os.path.abspath(src)) if src else None


def inventory(folder: Path, config: Path, generate: list[str], src: str | None = None) -> Path:
    """FOLDER/bootherd.db holding the testbed `bootherd testbed generate GENERATE...`
    writes, generated, migrated and imported by `src`'s own CLI (this checkout's when
    None): another checkout may be at another migration and know other testbed fields.
    `config` names its database relative to the folder it is copied into, or is there."""
    folder.mkdir(exist_ok=True)
    if config.parent.resolve() != folder.resolve():
        shutil.copy(config, folder / config.name)
    for cmd in (["testbed", "generate", *generate, "-o", "testbed.toml"],
                ["db", "upgrade", "-c", config.name],
                ["testbed", "import", "testbed.toml", "-c", config.name]):
        subprocess.run([sys.executable, "-m", "bootherd.cli", *cmd], cwd=folder, env=env(src),
                       check=True, capture_output=True)
    return folder / "bootherd.db"
