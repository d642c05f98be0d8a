"""The boot profile format: round trip, and corrupt or truncated files rejected clearly."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmthunder.lab.profile import (
    BootProfile,
    ProfileError,
    Read,
    dump_profile,
    load_profile,
    parse_profile,
    reads_from_trace,
)

SHA = "ab" * 32


def profile(
    reads: tuple[Read, ...] = (Read(0, 512, 0), Read(4096, 8192, 1500), Read(0, 512, 20)),
) -> BootProfile:
    return BootProfile(
        image_size=1 << 20,
        image_sha256=SHA,
        recorded_under="tcg",
        gap_scale=1.0,
        boot_seconds=12.5,
        reads=reads,
    )


def test_a_dumped_profile_parses_back_identical() -> None:
    p = profile()
    assert parse_profile(dump_profile(p)) == p


def test_bytes_read_counts_rereads_and_unique_bytes_does_not() -> None:
    p = profile()
    assert p.bytes_read == 512 + 8192 + 512
    assert p.unique_bytes == 512 + 8192


def test_regions_are_in_first_touch_order_without_repeats() -> None:
    p = profile((Read(70000, 10, 0), Read(0, 65537, 5), Read(65536, 10, 5)))
    assert p.regions(65536) == [1, 0]


def test_scaling_gaps_records_the_scale_used() -> None:
    p = profile().scaled(0.1)
    assert [r.gap_us for r in p.reads] == [0, 150, 2]
    assert p.gap_scale == pytest.approx(0.1)
    assert parse_profile(dump_profile(p)).gap_scale == pytest.approx(0.1)


def test_a_truncated_file_is_rejected() -> None:
    text = dump_profile(profile())
    cut = text[: text.rindex("end ")]
    with pytest.raises(ProfileError, match="truncated"):
        parse_profile(cut)
    with pytest.raises(ProfileError, match="truncated"):
        parse_profile(text[:-1])
    with pytest.raises(ProfileError, match="missing"):
        parse_profile("vmthunder-boot-profile 1\nimage-size 10\n")


def test_an_altered_read_line_fails_the_checksum() -> None:
    text = dump_profile(profile()).replace("4096 8192 1500", "4096 8192 1501")
    with pytest.raises(ProfileError, match="checksum"):
        parse_profile(text)


def test_reads_outside_the_image_and_garbage_are_rejected_with_the_line() -> None:
    bad = dump_profile(profile((Read((1 << 20) - 10, 512, 0),)))
    with pytest.raises(ProfileError, match=r":8: read .* outside the image"):
        parse_profile(bad)
    with pytest.raises(ProfileError, match="not a boot profile"):
        parse_profile("GIF89a\n")


def test_load_profile_names_an_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="cannot read"):
        load_profile(tmp_path / "missing.profile")
    (tmp_path / "bin.profile").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ProfileError):
        load_profile(tmp_path / "bin.profile")


def test_trace_lines_become_reads_with_gaps_until_the_boot_marker() -> None:
    lines = [
        "25274@1795530677.068729:blk_co_preadv blk 0x1 bs 0x2 offset 0 bytes 512 flags 0x0",
        "noise",
        "25274@1795530677.069729:blk_co_preadv blk 0x1 bs 0x2 offset 1048576 bytes 4096 flags 0x8",
        "25274@1795530679.000000:blk_co_preadv blk 0x1 bs 0x2 offset 512 bytes 512 flags 0x0",
    ]
    reads = reads_from_trace(lines, until_us=1795530678_000000)
    assert reads == (Read(0, 512, 0), Read(1048576, 4096, 1000))
