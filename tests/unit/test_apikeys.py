"""API key format, checksum and keyed hashing, including hostile inputs."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portcullis.credentials import apikeys
from portcullis.credentials.apikeys import KeyFormatError, KeyHasher

SCANNER_REGEX = re.compile(r"\bpcl_[0-9A-Za-z]{8}_[0-9A-Za-z]{38}\b")


def test_generated_key_parses_and_matches_scanner_regex() -> None:
    kid, key = apikeys.generate()
    assert apikeys.parse(key) == kid
    assert len(key) == apikeys.KEY_LEN
    assert SCANNER_REGEX.fullmatch(key)


def test_keys_are_unique() -> None:
    keys = {apikeys.generate()[1] for _ in range(200)}
    assert len(keys) == 200


@pytest.mark.parametrize("pos", [5, 14, 20, 40, 46, 50])
def test_single_character_typo_is_caught_by_checksum(pos: int) -> None:
    _, key = apikeys.generate()
    ch = key[pos]
    typo = key[:pos] + ("A" if ch != "A" else "B") + key[pos + 1:]
    assert apikeys.parse(typo) in (KeyFormatError.CHECKSUM, KeyFormatError.MALFORMED)


@pytest.mark.parametrize("bad", [
    "", "pcl_", "pcl_abc", "xyz_" + "a" * 47, "pcl_abcdefgh-" + "a" * 38, "pcl_abcd!fgh_" + "a" * 38,
    "pcl_abcdefgh_" + "a" * 37 + "é", "pcl_abcdefgh_" + "a" * 39, "PCL_abcdefgh_" + "a" * 38,
    "pcl_abcdefgh_" + "a" * 38 + "\x00",
])
def test_malformed_keys_refused_without_lookup(bad: str) -> None:
    assert apikeys.parse(bad) is KeyFormatError.MALFORMED


def test_swapped_checksum_refused() -> None:
    _, a = apikeys.generate()
    _, b = apikeys.generate()
    forged = a[:-6] + b[-6:]
    assert apikeys.parse(forged) is KeyFormatError.CHECKSUM


@given(st.text(max_size=200))
def test_parse_never_raises_on_arbitrary_text(text: str) -> None:
    result = apikeys.parse(text)
    assert isinstance(result, (str, KeyFormatError))
    if isinstance(result, str):
        assert SCANNER_REGEX.fullmatch(text)


@given(st.integers(min_value=0, max_value=apikeys.KEY_LEN - 1), st.sampled_from(apikeys.ALPHABET))
def test_any_single_substitution_is_detected(pos: int, ch: str) -> None:
    _, key = apikeys.generate("Abcdefgh")
    mutated = key[:pos] + ch + key[pos + 1:]
    if mutated != key:
        # CRC32 catches every burst error of up to 32 bits, so every one-character
        # substitution (in the id, the secret or the checksum itself) is refused.
        assert isinstance(apikeys.parse(mutated), KeyFormatError)


def test_hasher_is_keyed_and_constant_time_compare() -> None:
    _, key = apikeys.generate()
    h1 = KeyHasher(b"a" * 32)
    h2 = KeyHasher(b"b" * 32)
    assert h1.digest(key) != h2.digest(key)
    assert h1.matches(key, h1.digest(key))
    assert not h2.matches(key, h1.digest(key))
    assert len(h1.digest(key)) == 64


def test_short_pepper_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        KeyHasher(b"short")


def test_generate_rejects_bad_key_id() -> None:
    with pytest.raises(ValueError, match="8 base62"):
        apikeys.generate("bad id!!")
