"""Random short codes: base62 strings drawn from ``secrets``.

A code says nothing about its link, its creation time or its neighbours: it
is ``length`` independent draws from 62 symbols. Uniqueness is not promised
here; the store reserves each code with ``SET NX`` and draws again on a
collision.

The enumeration trade-off: with ``L`` symbols there are ``62**L`` codes. Once
``n`` links exist, a guessed code hits one with probability ``n / 62**L``.
At the default length 7 (3.5e12 codes) and a million links that is 1 in 3.5
million guesses, and a new code collides with an existing one just as
rarely, so creation almost never retries. Shorter codes are nicer to type but
both numbers grow: at length 5 (9.2e8 codes) one guess in 916 finds a link,
and a full length-2 space (3,844 codes) is used up quickly, which is what
``CodeSpaceExhausted`` is for.
"""

from __future__ import annotations

import secrets
import string

ALPHABET = string.digits + string.ascii_uppercase + string.ascii_lowercase
DEFAULT_CODE_LENGTH = 7  # 3.5e12 codes: enumeration is impractical, see above
MIN_CODE_LENGTH = 1
MAX_CODE_LENGTH = 22  # 62**22 > 2**128: longer buys nothing over a UUID
# Random codes use ALPHABET; aliases may also hold '_' and '-'.
PATH_CHARACTERS = frozenset(ALPHABET + "_-")
MAX_PATH_CHARS = 64  # the longest alias


def new_code(length: int = DEFAULT_CODE_LENGTH) -> str:
    """A fresh random code of ``length`` base62 symbols."""
    if not MIN_CODE_LENGTH <= length <= MAX_CODE_LENGTH:
        raise ValueError(
            f"code length {length} is outside {MIN_CODE_LENGTH}..{MAX_CODE_LENGTH}"
        )
    return "".join(secrets.choice(ALPHABET) for _ in range(length))


def code_space(length: int) -> int:
    """How many distinct codes of ``length`` symbols exist."""
    return int(len(ALPHABET) ** length)


def guess_hit_probability(links: int, length: int) -> float:
    """Chance that one random guess (or one new code) hits an existing link."""
    return min(1.0, links / code_space(length))


def is_code_shaped(text: str) -> bool:
    """Cheap check before any Redis lookup: could ``text`` be a code or alias?"""
    return 0 < len(text) <= MAX_PATH_CHARS and PATH_CHARACTERS.issuperset(text)
