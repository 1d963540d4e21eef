"""Random base62 codes."""

from __future__ import annotations

import pytest

from dslab.shortener.codes import (
    ALPHABET,
    code_space,
    guess_hit_probability,
    is_code_shaped,
    new_code,
)


def test_codes_have_the_asked_length_and_only_base62_symbols() -> None:
    """Every code is exactly `length` symbols from the 62-symbol alphabet."""
    for length in (1, 2, 7, 22):
        code = new_code(length)
        assert len(code) == length
        assert set(code) <= set(ALPHABET)


def test_codes_do_not_repeat_in_a_large_sample() -> None:
    """20,000 default-length codes are all distinct (collision odds ~6e-5)."""
    codes = {new_code() for _ in range(20_000)}
    assert len(codes) == 20_000


def test_impossible_lengths_are_refused() -> None:
    """Length 0 and lengths beyond 22 raise ValueError."""
    for length in (0, 23):
        with pytest.raises(ValueError):
            new_code(length)


def test_code_space_and_guess_probability() -> None:
    """The space is 62**L and a guess hits n / 62**L of the time."""
    assert code_space(2) == 3844
    assert guess_hit_probability(3844, 2) == 1.0
    assert guess_hit_probability(1_000_000, 7) == pytest.approx(2.86e-7, rel=0.01)


def test_code_shape_check_refuses_paths_that_cannot_be_codes() -> None:
    """Dots, slashes, empty and over-long strings are never looked up."""
    assert is_code_shaped("aZ9_-")
    for text in ("", "a.b", "a/b", "x" * 65, "ü"):
        assert not is_code_shaped(text)
