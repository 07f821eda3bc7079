"""File helpers every stage uses: one atomic directory writer, one atomic file writer, one hasher.

Nothing is ever half-written: a directory or file is built under a temporary sibling name and
renamed into place (``os.replace``/``os.rename`` are atomic within a file system), and the
temporary is removed on any failure. Leftover temporaries of a killed process (``.NAME.tmp-*``,
``.NAME.old-*``) are swept by :func:`sweep_temporaries`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from tasks.errors import InputError


@contextlib.contextmanager
def atomic_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory of ``target``; rename it to ``target`` on success.

    On any exception the temporary directory is removed and ``target`` is left as it was (a
    replaced ``target`` is put back if the final swap fails half-way).
    """
    target = Path(target)
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise InputError(f"{target}: already exists (use --overwrite to replace it)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as exc:
        raise InputError(f"{target}: cannot create it: {exc.strerror or exc}") from None
    old: Path | None = None
    try:
        yield tmp
        if target.exists() or target.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "x")
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not target.exists() and (old / "x").exists():
            os.replace(old / "x", target)  # put the previous output back
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; ``os.replace`` it onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (insertion order: deterministic and readable), atomically."""
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def without_timings(obj: Any) -> Any:
    """``obj`` without its ``seconds`` entries, at any depth: what DVC tracks (the model directory,
    the reports) is a function of the data, params and code — `infrec run` and `dvc repro` give
    the same hashes — so wall times go to the log, the run summary and MLflow instead."""
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    return obj


def sha256_file(path: str | Path, src: str | None = None) -> str:
    """Full SHA-256 hex digest of a file (an :class:`InputError` naming it when unreadable)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except OSError as exc:
        raise InputError(f"{src or path}: cannot read file: {exc.strerror or exc}") from None
    return h.hexdigest()


def content_hash(path: str | Path, length: int = 12) -> str:
    """SHA-256 of a file, or of a directory's files (relative names + contents), shortened."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)[:length]
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path).as_posix()).encode() + b"\0")
        h.update(bytes.fromhex(sha256_file(f)))
    return h.hexdigest()[:length]


def sweep_temporaries(directory: str | Path) -> list[Path]:
    """Remove the ``.NAME.tmp-*`` / ``.NAME.old-*`` leftovers of killed writers in ``directory``
    (one level). Returns what was removed."""
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        if entry.name.startswith(".") and (".tmp-" in entry.name or ".old-" in entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def read_json(path: str | Path, what: str = "file") -> Any:
    """Parse a JSON file; a missing or malformed one is an :class:`InputError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: missing ({what})")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: unreadable {what} ({type(exc).__name__}: {exc})") from None


__all__ = ["atomic_dir", "atomic_file", "write_text", "write_json", "read_json", "sha256_file",
           "without_timings",
           "content_hash", "sweep_temporaries"]
