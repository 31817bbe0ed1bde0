"""obelisk/versions.py: the one version pattern and order."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from obelisk.versions import compare_versions, is_version


@pytest.mark.parametrize("v", ["1", "1.0.0", "3815.2.0", "1.2.0-rc1", "1.0+local.3"])
def test_good_versions(v: str) -> None:
    assert is_version(v)


@pytest.mark.parametrize("v", ["", "1.0.0\n", " 1.0", "v1.0", "1..0", "1.0/../x", "1.0 2"])
def test_bad_versions(v: str) -> None:
    assert not is_version(v)


def test_order() -> None:
    assert compare_versions("1.10.0", "1.9.0") == 1
    assert compare_versions("1.2", "1.2.0") == 0
    assert compare_versions("1.2.0-rc1", "1.2.0") == 0  # the suffix does not order releases
    assert compare_versions("0.9", "1.0") == -1


@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=5), st.lists(st.integers(0, 10**6), min_size=1, max_size=5))
def test_order_is_antisymmetric(a: list[int], b: list[int]) -> None:
    va, vb = ".".join(map(str, a)), ".".join(map(str, b))
    assert compare_versions(va, vb) == -compare_versions(vb, va)
