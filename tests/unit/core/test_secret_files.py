"""Secret files: owner-only from creation, replaced atomically, created once under a race."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from federated_learning.secret_files import (
    SecretFileError,
    keep_or_create_secret,
    private_folder,
    read_secret,
    write_secret,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """umask 0: a file made with a plain open() would be world-readable."""
    previous = os.umask(0)
    yield
    os.umask(previous)


@pytest.mark.usefixtures("permissive_umask")
def test_a_secret_is_0600_before_it_gets_its_name_and_after(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "deployment.json"
    seen: list[tuple[str, int, bool]] = []
    real_replace = os.replace

    def spying_replace(source: str | os.PathLike[str], destination: str | os.PathLike[str]) -> None:
        seen.append((Path(source).read_text(), mode(Path(source)), Path(destination).exists()))
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", spying_replace)
    write_secret(target, '{"api_key": "k"}')

    assert seen == [('{"api_key": "k"}', 0o600, False)]
    assert mode(target) == 0o600 and target.read_text() == '{"api_key": "k"}'
    assert sorted(tmp_path.iterdir()) == [target]


@pytest.mark.usefixtures("permissive_umask")
def test_an_existing_looser_file_is_replaced_by_a_new_0600_file(tmp_path: Path) -> None:
    target = tmp_path / "api_key"
    target.write_text("old")
    target.chmod(0o644)
    old_inode = target.stat().st_ino
    held_open = target.open()

    write_secret(target, "new")

    assert target.read_text() == "new" and mode(target) == 0o600
    assert target.stat().st_ino != old_inode
    assert held_open.read() == "old"
    held_open.close()


def test_a_failed_write_keeps_the_old_secret_and_leaves_no_temporary(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "redis_password"
    write_secret(target, "old")

    def full_disk(_fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_secret(target, "new")

    assert target.read_text() == "old"
    assert sorted(tmp_path.iterdir()) == [target]


@pytest.mark.usefixtures("permissive_umask")
def test_a_kept_secret_is_made_once_and_then_read_back(tmp_path: Path) -> None:
    target = tmp_path / "fl-services"

    first = keep_or_create_secret(target, lambda: "first")
    second = keep_or_create_secret(target, lambda: "second")

    assert (first, second) == ("first", "first")
    assert mode(target) == 0o600
    assert sorted(tmp_path.iterdir()) == [target]


def test_the_loser_of_a_creation_race_returns_the_winners_secret(tmp_path: Path) -> None:
    target = tmp_path / "fl-agent-a1"

    def racing_generator() -> str:
        # Another process creates the file after our existence check, before our link.
        write_secret(target, "winner")
        return "loser"

    assert keep_or_create_secret(target, racing_generator) == "winner"
    assert target.read_text() == "winner"
    assert sorted(tmp_path.iterdir()) == [target]


def test_an_empty_secret_file_is_refused_with_its_path(tmp_path: Path) -> None:
    target = tmp_path / "api_key"
    target.write_text("\n")
    with pytest.raises(SecretFileError, match=f"secret file {target} is empty"):
        read_secret(target)


@pytest.mark.usefixtures("permissive_umask")
def test_a_private_folder_is_created_or_tightened_to_0700(tmp_path: Path) -> None:
    existing = tmp_path / "run"
    existing.mkdir(mode=0o755)
    existing.chmod(0o755)

    assert mode(private_folder(existing)) == 0o700
    assert mode(private_folder(tmp_path / "a" / "secrets")) == 0o700
