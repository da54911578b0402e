"""Validation files are confined to the deployment's validation folder, read without blocking,
and every unusable name gets the same message (existing files cannot be told from missing ones)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from federated_learning.records.validation_sets import InvalidValidationSet, load_validation_set


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    folder = tmp_path / "validation"
    folder.mkdir()
    np.savez(folder / "good.npz", x=np.zeros((4, 3), np.float32), y=np.array([0, 1, 0, 1]))
    return folder


def test_a_file_of_the_folder_is_loaded(folder: Path) -> None:
    x, y = load_validation_set(folder, "good.npz", 3, 2)
    assert x.shape == (4, 3) and y.tolist() == [0, 1, 0, 1]


def test_names_outside_the_folder_missing_files_fifos_and_links_read_the_same(folder: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret.npz"
    np.savez(outside, x=np.zeros((4, 3)), y=np.zeros(4, int))
    os.mkfifo(folder / "fifo.npz")
    (folder / "link.npz").symlink_to(outside)
    (folder / "sub").mkdir()
    (folder / "junk.npz").write_bytes(b"not an npz")
    messages = set()
    for name in (str(outside), "../secret.npz", "missing.npz", "fifo.npz", "link.npz", "sub", "junk.npz", "",
                 "/dev/stdin", "."):
        with pytest.raises(InvalidValidationSet) as refused:
            load_validation_set(folder, name, 3, 2)
        messages.add(str(refused.value).replace(repr(name), "NAME"))
    assert len(messages) == 1 and "validation_data_dir" in messages.pop()


def test_a_file_that_does_not_fit_the_model_names_the_reason(folder: Path) -> None:
    with pytest.raises(InvalidValidationSet, match="do not fit a model of 5 features"):
        load_validation_set(folder, "good.npz", 5, 2)
    with pytest.raises(InvalidValidationSet, match="labels must be integers in"):
        load_validation_set(folder, "good.npz", 3, 1)
