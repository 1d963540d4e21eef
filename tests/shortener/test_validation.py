"""URL and alias validation: what is accepted, what is refused, and why."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.provisional import urls

from dslab.errors import UsageError
from dslab.shortener.validation import (
    ASCII_INVISIBLE,
    REFUSED_CATEGORIES,
    InvalidAlias,
    InvalidURL,
    validate_alias,
    validate_url,
)

OWN = ("sho.rt",)
HOSTILE = [
    "javascript:alert(1)",
    "JaVaScRiPt:alert(1)",
    " javascript:alert(1)",
    "\thttp://example.com/",
    " https://example.com/",
    "data:text/html;base64,PHNjcmlwdD4=",
    "file:///etc/passwd",
    "ftp://example.com/",
    "//example.com/",
    "example.com",
    "http://user:pass@example.com/",
    "http://example.com@evil.com/",
    "http://@example.com/",
    "http://evil.com\\@example.com/",
    "http://\u0430pple.com/",  # a Cyrillic letter among Latin ones
    "http://\u0430\u0440\u0440\u04cf\u0435.com/",  # apple, all Cyrillic
    "http://xn--80ak6aa92e.com/",  # the same, already in punycode
    "http://example.com/" + "a" * 2030,  # 2049 characters
    "http://example.com/\r\nSet-Cookie:x=1",
    "http://example.com/%0d%0aSet-Cookie:x=1",
    "http://example.com/%0D%0A",
    "http://example.com/\x00",
    "http://exa\u200bmple.com/",  # zero-width space
    "http://example.com/\u202e",  # right-to-left override
    "https://sho.rt/abc",
    "https://SHO.RT./abc",
    "https://www.sho.rt/abc",
    "http://127.0.0.1/",
    "http://localhost:8080/",
    "http://[::1]/",
    "http://10.0.0.1/",
    "http://2130706433/",
    "http://0x7f.1/",
    "http:///no-host",
    "http://example.com:0/",
    "http://example.com:99999/",
    "",
]


@pytest.mark.parametrize("raw", HOSTILE)
def test_hostile_inputs_are_refused(raw: str) -> None:
    """Each hostile URL raises InvalidURL, a UsageError with a message."""
    with pytest.raises(InvalidURL) as refused:
        validate_url(raw, own_hosts=OWN)
    assert isinstance(refused.value, UsageError)
    assert refused.value.message


def test_the_corpus_holds_a_url_one_past_the_limit() -> None:
    """The over-long corpus entry is exactly 2049 characters, one past 2048."""
    assert any(len(raw) == 2049 for raw in HOSTILE)


@pytest.mark.parametrize(
    ("raw", "stored"),
    [
        ("https://example.com/a?b=c#d", "https://example.com/a?b=c#d"),
        ("HTTPS://Example.COM", "https://example.com/"),
        ("http://example.com:80/x", "http://example.com/x"),
        ("https://example.com:8443/x", "https://example.com:8443/x"),
        ("http://münchen.de/straße", "http://xn--mnchen-3ya.de/stra%C3%9Fe"),
        ("http://пример.рф/", "http://xn--e1afmkfd.xn--p1ai/"),
        ("http://example.com/100%", "http://example.com/100%25"),
        ("http://8.8.8.8/dns", "http://8.8.8.8/dns"),
        ("http://[2606:4700::1111]/", "http://[2606:4700::1111]/"),
    ],
)
def test_accepted_urls_are_normalised(raw: str, stored: str) -> None:
    """Scheme and host are lower-cased, hosts punycoded, default ports dropped."""
    assert validate_url(raw) == stored


def test_private_hosts_pass_only_when_allowed() -> None:
    """Loopback and localhost are accepted with allow_private=True."""
    assert validate_url("http://127.0.0.1:9/x", allow_private=True) == (
        "http://127.0.0.1:9/x"
    )
    assert validate_url("http://localhost/", allow_private=True) == (
        "http://localhost/"
    )


def test_blocklist_matches_whole_label_suffixes() -> None:
    """A blocked domain blocks its subdomains but not look-alike names."""
    blocked = ("bad.example",)
    for raw in ("http://bad.example/", "http://x.y.BAD.example/"):
        with pytest.raises(InvalidURL):
            validate_url(raw, blocklist=blocked)
    assert validate_url("http://notbad.example/", blocklist=blocked)


def test_length_limit_is_configurable() -> None:
    """A URL over max_length is refused; at the limit it passes."""
    url = "http://example.com/" + "a" * 11
    assert validate_url(url, max_length=30) == url
    with pytest.raises(InvalidURL):
        validate_url(url + "a", max_length=30)


@settings(max_examples=300, deadline=None)
@given(urls())
@example("http://example.com/%zz")
@example("https://a.b/ä?ö=1#ü")
def test_valid_output_revalidates_to_itself(raw: str) -> None:
    """validate(validate(x)) == validate(x), and the output is ASCII, no CR/LF."""
    try:
        stored = validate_url(raw)
    except InvalidURL:
        return
    assert validate_url(stored) == stored
    assert stored.isascii()
    assert "\r" not in stored and "\n" not in stored


CONTROL = st.sampled_from([chr(c) for c in [*range(0, 32), 127, 0x85, 0x2028]])


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40), CONTROL, st.text(max_size=40))
def test_nothing_with_a_control_character_passes(
    before: str, control: str, after: str
) -> None:
    """A control or line-separator character anywhere means refusal."""
    with pytest.raises(InvalidURL):
        validate_url("https://example.com/" + before + control + after)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_is_either_refused_or_safe(raw: str) -> None:
    """Any string yields InvalidURL or an http(s) URL without whitespace."""
    try:
        stored = validate_url(raw)
    except InvalidURL:
        return
    assert stored.startswith(("http://", "https://"))
    assert not any(char.isspace() for char in stored)


@settings(max_examples=200, deadline=None)
@given(st.from_regex(r"[A-Za-z0-9_-]{3,64}", fullmatch=True))
def test_aliases_in_the_charset_pass_unless_reserved(alias: str) -> None:
    """Any 3-64 character alias of [A-Za-z0-9_-] is accepted as-is."""
    assume(alias.lower() not in {"api", "www", "qr", "docs", "help", "index"})
    try:
        assert validate_alias(alias) == alias
    except InvalidAlias as refused:
        assert "reserved" in refused.message


@pytest.mark.parametrize(
    "alias", ["ab", "x" * 65, "has space", "dot.dot", "slash/x", "ümlaut", "API",
              "healthz", "metrics", "static"],
)
def test_bad_aliases_are_refused(alias: str) -> None:
    """Too short, too long, outside the charset, or reserved: InvalidAlias."""
    with pytest.raises(InvalidAlias):
        validate_alias(alias)


def test_the_ascii_scan_refuses_exactly_what_the_unicode_rule_refuses() -> None:
    """The fast path for ASCII URLs (one regex scan) matches, character by
    character, the rule applied to every other URL."""
    for code in range(128):
        char = chr(code)
        by_rule = char.isspace() or unicodedata.category(char) in REFUSED_CATEGORIES
        assert bool(ASCII_INVISIBLE.fullmatch(char)) == by_rule, hex(code)


def test_a_remembered_host_is_still_refused_or_accepted_the_same_way() -> None:
    """The per-process cache of normalised hosts keeps every verdict: the
    second call refuses or accepts exactly like the first."""
    for _ in range(2):
        assert validate_url("https://Bücher.example/x") == \
            "https://xn--bcher-kva.example/x"
        with pytest.raises(InvalidURL):
            validate_url("https://127.0.0.1/x")
        assert validate_url("https://127.0.0.1/x", allow_private=True) == \
            "https://127.0.0.1/x"
