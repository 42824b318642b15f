"""Files appear whole or not at all: write to a temporary file in the same folder, then os.replace."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)


def write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Call write(temporary_path), then move it onto `path`; the temporary file never outlives an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(temporary))
        # mkstemp makes 0600, and some writers replace the file (safetensors: 0600 too): read like any new file
        os.chmod(temporary, 0o666 & ~_UMASK)
        os.replace(temporary, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return path


def build_staged_folder(folder: Path, build: Callable[[Path], None]) -> Path:
    """Run build(staging) in a fresh hidden sibling of `folder` and return the staging folder, its files with
    the permissions of any new file; the caller moves it into place. It never outlives an error."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        build(staging)
        for path in [staging, *staging.iterdir()]:  # mkdtemp makes 0700, safetensors 0600
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_UMASK)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def publish_folder(built: Path, folder: Path) -> None:
    """Move a finished staging folder onto `folder`. A folder already there is moved aside first (os.replace
    cannot overwrite a non-empty folder) and deleted once the new one is in place."""
    stale = None
    if folder.exists():
        stale = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".stale"))
        os.replace(folder, stale / folder.name)
    os.replace(built, folder)
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)
