"""The node plugin's bind mounts, made by the mount syscall on this machine's own kernel."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from vmthunder.csi import mount


def test_a_read_only_bind_mount_shows_the_source_refuses_writes_and_comes_off(
        tmp_path: Path) -> None:
    source, target = tmp_path / "device", tmp_path / "target"
    source.write_text("golden")
    target.touch()
    mount.bind(str(source), str(target), readonly=True)
    try:
        found = mount.mounted_at(str(target))
        assert found is not None and found.readonly
        assert target.read_text() == "golden"
        with pytest.raises(OSError) as e:
            target.write_text("changed")
        assert e.value.errno == errno.EROFS
    finally:
        mount.umount(str(target))
    assert mount.mounted_at(str(target)) is None
    target.write_text("the file under it")
    assert source.read_text() == "golden"


def test_a_failed_mount_says_which_call_and_why(tmp_path: Path) -> None:
    with pytest.raises(mount.MountError, match="No such file or directory") as e:
        mount.bind(str(tmp_path / "absent"), str(tmp_path / "nowhere"))
    assert e.value.returncode == errno.ENOENT
    with pytest.raises(mount.MountError, match="Invalid argument"):
        mount.umount(str(tmp_path))  # nothing mounted there
    assert os.path.isdir(tmp_path)


def test_a_read_only_bind_keeps_the_nosuid_nodev_noexec_of_what_it_binds(
        tmp_path: Path) -> None:
    # A tmpfs of our own with those flags, and a read-only bind of a file on it.
    fs = tmp_path / "fs"
    fs.mkdir()
    mount.mount("tmpfs", str(fs), "tmpfs", ["nosuid", "nodev", "noexec"], readonly=False)
    try:
        (fs / "device").write_text("golden")
        target = tmp_path / "target"
        target.touch()
        mount.bind(str(fs / "device"), str(target), readonly=True)
        try:
            found = mount.mounted_at(str(target))
            assert found is not None
            assert {"ro", "nosuid", "nodev", "noexec"} <= found.options
        finally:
            mount.umount(str(target))
    finally:
        mount.umount(str(fs))
