"""Atomic output helpers.

Every stage output is written to a temporary sibling first and then renamed
into place, so a run killed half-way never leaves a half-written file that DVC
(or the next stage) could mistake for a finished one. ``os.replace`` is atomic
on POSIX when source and target are on the same file system, which a sibling
temp path guarantees.

``tempfile.mkstemp``/``mkdtemp`` create 0600 files and 0700 folders whatever
the umask; outputs get the permissions a plain ``open``/``mkdir`` would give
(0644/0755 under the usual umask 022), so another account serving the app can
read what the pipeline built.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_permissions(path: str | os.PathLike, directory: bool = False) -> None:
    """Give ``path`` the mode ``open``/``mkdir`` would: 0666/0777 less the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside ``target``; rename it over ``target`` on success.

    On an exception the temporary file is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    normal_permissions(tmp_path)
    try:
        yield tmp_path
        if tmp_path.exists():  # the caller may have replaced the file (e.g. torch.save, to_parquet)
            normal_permissions(tmp_path)
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``target``; swap it in for ``target`` on success.

    The old directory (if any) is moved aside first and deleted only after the
    new one is in place, so at every instant ``target`` is either the complete
    old output or the complete new one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    normal_permissions(tmp, directory=True)
    try:
        yield tmp
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / "d")
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike, obj: object) -> None:
    """Write ``obj`` as sorted, indented JSON (stable bytes for git diffs)."""
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"))


def write_parquet_atomic(path: str | os.PathLike, df: pd.DataFrame) -> None:
    """Write a DataFrame to Parquet atomically, without the index.

    Callers validate the frame against its schema first (see
    :mod:`facesearch.data.manifest`); this function only guarantees the bytes land
    whole. The output is byte-identical for identical frames, which is what
    makes DVC skip unchanged downstream stages.
    """
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False, engine="pyarrow", compression="zstd")
