"""Files that hold secrets (passwords, API keys, URLs with credentials): owner-only from creation.

A secret is first written under a temporary name in its target's folder, a file created with
``O_CREAT | O_EXCL`` and mode 0600 (the umask can only narrow it), synced, and then renamed over
the target (or linked to it, when it must be created only once). A reader sees the old file or
the new one, never a partial one, and no name ever points at a file that others may read.
Folders that hold secrets are 0700.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

SECRET_FILE_MODE = 0o600
SECRET_FOLDER_MODE = 0o700
TEMPORARY_SUFFIX = ".tmp"


class SecretFileError(ValueError):
    """A secret file that exists but holds nothing usable."""


def private_folder(path: Path) -> Path:
    """``path`` as a folder only its owner may enter: created (with its parents) or tightened to 0700."""
    path.mkdir(parents=True, exist_ok=True, mode=SECRET_FOLDER_MODE)
    path.chmod(SECRET_FOLDER_MODE)
    return path


def _temporary_copy(folder: Path, content: bytes) -> Path:
    """A new file in ``folder`` holding ``content``: mode 0600 from its creation, synced to disk."""
    temporary = folder / f".{secrets.token_hex(8)}{TEMPORARY_SUFFIX}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, SECRET_FILE_MODE)
    try:
        # The umask may have narrowed the mode further (e.g. to 0400); make it exactly 0600.
        os.fchmod(fd, SECRET_FILE_MODE)
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        temporary.unlink(missing_ok=True)
        raise
    os.close(fd)
    return temporary


def _sync_folder(folder: Path) -> None:
    """Make a rename or link in ``folder`` durable (the folder's own entry list is synced)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_secret(path: Path, content: str) -> None:
    """Write ``content`` to ``path`` (mode 0600 from creation), replacing an existing file atomically."""
    temporary = _temporary_copy(path.parent, content.encode())
    try:
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def read_secret(path: Path) -> str:
    """The secret in ``path``, without surrounding whitespace; refuses an empty file."""
    value = path.read_text().strip()
    if not value:
        raise SecretFileError(f"secret file {path} is empty; delete it to have a new secret made")
    return value


def keep_or_create_secret(path: Path, generate: Callable[[], str]) -> str:
    """The secret in ``path``; when there is none yet, ``generate()``'s, written once (mode 0600).

    Two processes that race here both return the same secret: each links its own complete file
    to ``path``, the first link wins, and the loser reads the winner's.
    """
    if path.exists():
        return read_secret(path)
    temporary = _temporary_copy(path.parent, generate().encode())
    try:
        os.link(temporary, path)
    except FileExistsError:
        pass
    finally:
        temporary.unlink(missing_ok=True)
    _sync_folder(path.parent)
    return read_secret(path)
