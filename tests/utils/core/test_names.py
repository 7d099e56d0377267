"""safe_name keeps a name readable and inside its folder; did_you_mean offers the closest names."""

from __future__ import annotations

import pytest

from utils.core.names import did_you_mean, safe_name, safe_relative


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("bottle", "bottle"),
        ("../../../x", "x"),
        ("a/b.png", "a_b.png"),
        ("a\\b", "a_b"),
        (".hidden", "hidden"),
        ("a..b", "a.b"),
        ("tab\there\x00", "tabhere"),
        ("..", "_"),
        ("", "_"),
    ],
)
def test_safe_name(name, expected):
    assert safe_name(name) == expected


def test_an_over_long_name_is_hashed_to_255_bytes_keeping_its_suffix():
    long_a, long_b = "é" * 200 + "a.png", "é" * 200 + "b.png"
    assert len(safe_name(long_a).encode()) == 255 and safe_name(long_a).endswith(".png")
    assert safe_name(long_a) != safe_name(long_b)


def test_safe_relative_drops_roots_and_parents():
    assert safe_relative("/abs/../y.png").as_posix() == "abs/y.png"
    assert safe_relative("tile/test/good/000.png").as_posix() == "tile/test/good/000.png"


def test_did_you_mean():
    assert did_you_mean("feclp", ["aaclip", "feclip", "sowa"]) == "; did you mean feclip?"
    assert did_you_mean("zzz", ["aaclip"]) == ""
    assert did_you_mean("mvtec", ["MVTec", "VisA"], "see X") == "; did you mean MVTec? (see X)"
