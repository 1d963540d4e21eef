"""Decide which long URLs and aliases the shortener accepts, and normalise them.

``validate_url`` either returns one canonical, ASCII-only form of the URL or
raises ``InvalidURL`` saying what is wrong. Guarantees for an accepted URL:

- the scheme is ``http`` or ``https`` (any case in, lower case out);
- no control, format or whitespace character appears anywhere, neither raw
  nor percent-encoded (``%0d%0a``), so it is safe in a ``Location`` header;
- there is a host and no userinfo (``user@`` tricks are refused);
- the host is stored in IDNA (punycode) form; a label that mixes scripts or
  spells a Latin word in look-alike letters (an IDN homograph) is refused;
- IP literals: public addresses are accepted as written; loopback, private,
  link-local and other non-global addresses, ``localhost`` and the numeric
  host forms browsers read as IPv4 (``2130706433``, ``0x7f.1``) are refused
  unless ``allow_private`` is set (a lab serving its own loopback pages);
- the host is not one of the shortener's own hosts (no redirect loops) and is
  not under a blocklisted domain (suffix match on whole labels);
- validating the result again returns it unchanged.

Parsing is done by yarl (what aiohttp uses) and the host by ``idna``; the only
hand-written pattern is the alias character set.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import unicodedata
from collections.abc import Iterable
from urllib.parse import urlsplit

import idna
from yarl import URL

from dslab.shortener.errors import InvalidAlias, InvalidURL

__all__ = [
    "DEFAULT_MAX_URL_LENGTH",
    "RESERVED_ALIASES",
    "InvalidAlias",
    "InvalidURL",
    "normalise_host",
    "validate_alias",
    "validate_url",
]

# Common browser and server limits sit around 2 KB; longer URLs are nearly
# always generated junk or an attack on someone's logs.
DEFAULT_MAX_URL_LENGTH = 2048
ALIAS_MIN_CHARS = 3  # shorter aliases would squat most of the readable space
ALIAS_MAX_CHARS = 64  # the longest path segment a person would still type
ALIAS_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
# Paths the server itself answers, plus names people expect a site to own.
RESERVED_ALIASES = frozenset(
    {
        "api", "healthz", "metrics", "static", "admin", "login", "logout",
        "favicon", "robots", "index", "www", "assets", "qr", "docs", "help",
    }
)
ALLOWED_SCHEMES = ("http", "https")
# %00-%1F and %7F: encoded control characters, CR and LF among them.
ENCODED_CONTROL = re.compile(r"%(?:[01][0-9A-Fa-f]|7[Ff])")
# Unicode categories refused anywhere: controls, format characters (zero
# width, bidi overrides), surrogates, unassigned, and every kind of space.
REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Cn", "Zs", "Zl", "Zp"})
# The ASCII characters of REFUSED_CATEGORIES plus those isspace() accepts:
# C0 controls, space and DEL (a test checks this against the rule itself).
ASCII_INVISIBLE = re.compile(r"[\x00-\x20\x7f]")
# Normalised hosts remembered per process: IDNA and homograph checks cost
# about 100 µs a host, and the hosts people link to repeat.
HOST_CACHE_ENTRIES = 4096
# Cyrillic and Greek letters that render like Latin ones; a label written only
# in these (plus digits and hyphens) imitates a Latin name.
LATIN_LOOKALIKES = frozenset(
    "аеорсуххіјѕԁԛԝӏһкмпнтвгь"  # Cyrillic
    "αοτνκιρυχεβ"  # Greek
)


def validate_url(
    raw: str,
    *,
    own_hosts: Iterable[str] = (),
    blocklist: Iterable[str] = (),
    max_length: int = DEFAULT_MAX_URL_LENGTH,
    allow_private: bool = False,
) -> str:
    """Return the canonical form of ``raw`` or raise ``InvalidURL``."""
    if not isinstance(raw, str) or not raw:
        raise InvalidURL("the URL is empty", fix="give an http:// or https:// URL")
    if len(raw) > max_length:
        raise InvalidURL(
            f"the URL is {len(raw)} characters long; the limit is {max_length}",
            fix="shorten the URL (drop tracking parameters)",
        )
    _refuse_invisible_characters(raw)

    scheme = urlsplit(raw).scheme.lower() if ":" in raw else ""
    if scheme not in ALLOWED_SCHEMES:
        shown = f"{scheme!r}" if scheme else "no scheme"
        raise InvalidURL(
            f"scheme {shown} is not allowed", fix="only http:// and https:// URLs"
        )
    authority = urlsplit(raw).netloc
    if "@" in authority:
        raise InvalidURL(
            "the URL carries a user name or password (userinfo)",
            fix="remove the part before '@' in the host",
        )
    try:
        url = URL(raw)
    except (ValueError, TypeError, UnicodeError) as exc:
        raise InvalidURL(f"the URL cannot be parsed: {exc}") from None
    if not url.raw_host:
        raise InvalidURL("the URL has no host", fix="write it as https://host/path")

    if url.explicit_port == 0:
        raise InvalidURL("port 0 cannot be connected to", fix="drop ':0'")
    host = normalise_host(url.raw_host, allow_private=allow_private)
    _refuse_listed_host(host, own_hosts, blocklist)
    try:
        canonical = URL.build(
            scheme=scheme,
            host=host,
            port=url.explicit_port,
            path=url.raw_path or "/",
            query_string=url.raw_query_string,
            fragment=url.raw_fragment,
            encoded=True,
        )
        result = str(canonical)
    except ValueError as exc:
        raise InvalidURL(f"the URL cannot be rebuilt: {exc}") from None
    if len(result) > max_length:
        raise InvalidURL(
            f"the URL is {len(result)} characters long once encoded; the limit "
            f"is {max_length}",
            fix="shorten the URL (non-ASCII characters take several bytes)",
        )
    _refuse_invisible_characters(result)
    return result


@functools.lru_cache(maxsize=HOST_CACHE_ENTRIES)
def normalise_host(host: str, *, allow_private: bool = False) -> str:
    """The host as stored: an IP literal, or an IDNA (punycode) lower-case name."""
    bare = host.strip("[]")
    address = _ip_literal(bare)
    if address is not None:
        if not allow_private and not address.is_global:
            raise InvalidURL(
                f"{bare} is a {_address_kind(address)} address",
                fix="link to a public host",
            )
        # Stored as it appears in a URL, so IPv6 keeps its brackets.
        return f"[{address.compressed}]" if address.version == 6 else str(address)

    name = host.rstrip(".").lower()
    if not name:
        raise InvalidURL("the URL has no host", fix="write it as https://host/path")
    try:
        ascii_name = idna.encode(name, uts46=True).decode("ascii")
        unicode_name = idna.decode(ascii_name)
    except (idna.IDNAError, UnicodeError) as exc:
        raise InvalidURL(f"host {host!r} is not a valid domain name: {exc}") from None

    labels = ascii_name.split(".")
    last = labels[-1]
    if last.isdigit() or last.startswith("0x"):
        # Browsers read 2130706433 or 0x7f.1 as IPv4 addresses.
        raise InvalidURL(
            f"host {host!r} is a numeric address in disguise",
            fix="write IP addresses in dotted form (203.0.113.7)",
        )
    if not allow_private and (ascii_name == "localhost" or last == "localhost"):
        raise InvalidURL(f"host {host!r} is this machine", fix="link to a public host")
    for label in unicode_name.split("."):
        _refuse_homograph(label, host)

    return ascii_name


def validate_alias(raw: str) -> str:
    """Return ``raw`` if it may be used as a custom code, else raise InvalidAlias."""
    if not isinstance(raw, str):
        raise InvalidAlias("the alias must be a string")
    if not ALIAS_MIN_CHARS <= len(raw) <= ALIAS_MAX_CHARS:
        raise InvalidAlias(
            f"the alias is {len(raw)} characters; allowed are "
            f"{ALIAS_MIN_CHARS} to {ALIAS_MAX_CHARS}",
        )
    if not ALIAS_PATTERN.fullmatch(raw):
        raise InvalidAlias(
            f"alias {raw!r} has characters outside A-Z a-z 0-9 _ -",
            fix="use letters, digits, '_' and '-' only",
        )
    if raw.lower() in RESERVED_ALIASES:
        raise InvalidAlias(
            f"alias {raw!r} is reserved", fix="pick another word for the alias"
        )
    return raw


def _refuse_invisible_characters(text: str) -> None:
    if text.isascii():
        # The same rule, in one C-speed scan: the ASCII characters in
        # REFUSED_CATEGORIES or with isspace() are exactly these.
        first = ASCII_INVISIBLE.search(text)
        if first is not None:
            _refuse_character(text, first.start())
    else:
        for position, char in enumerate(text):
            if char.isspace() or unicodedata.category(char) in REFUSED_CATEGORIES:
                _refuse_character(text, position)
    found = ENCODED_CONTROL.search(text)
    if found:
        raise InvalidURL(
            f"{found.group()} at position {found.start()} encodes a control "
            "character (CR/LF header injection)",
            fix="remove encoded control characters",
        )


def _refuse_character(text: str, position: int) -> None:
    raise InvalidURL(
        f"character U+{ord(text[position]):04X} at position {position} is a "
        "control, invisible or space character",
        fix="percent-encode spaces as %20 and remove control characters",
    )


def _refuse_listed_host(
    host: str, own_hosts: Iterable[str], blocklist: Iterable[str]
) -> None:
    for own in own_hosts:
        if _under(host, _normalise_listed(own)):
            raise InvalidURL(
                f"host {host} is the shortener itself",
                fix="a short link to a short link would loop; link to the target",
            )
    for domain in blocklist:
        if _under(host, _normalise_listed(domain)):
            raise InvalidURL(
                f"host {host} is under the blocked domain {domain}",
                fix="this domain may not be shortened here",
            )


def _normalise_listed(domain: str) -> str:
    """Lists may hold Unicode names or IP literals; compare in stored form."""
    try:
        return normalise_host(domain.strip().strip("."), allow_private=True)
    except InvalidURL:
        return domain.strip().strip(".").lower()


def _under(host: str, domain: str) -> bool:
    return bool(domain) and (host == domain or host.endswith("." + domain))


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _address_kind(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if address.is_loopback:
        return "loopback"
    if address.is_private:
        return "private"
    if address.is_link_local:
        return "link-local"
    return "non-public"


def _script(char: str) -> str:
    """The script of a letter, from its Unicode name (LATIN, CYRILLIC, ...)."""
    if not char.isalpha():
        return "COMMON"
    name = unicodedata.name(char, "UNKNOWN")
    return name.split(" ", 1)[0]


def _refuse_homograph(label: str, host: str) -> None:
    scripts = {_script(char) for char in label} - {"COMMON"}
    if len(scripts) > 1:
        raise InvalidURL(
            f"host {host!r} mixes scripts ({', '.join(sorted(scripts))}) in one "
            "label, a common way to imitate another site",
            fix="write the host in one script",
        )
    letters = [char for char in label if char.isalpha()]
    if (
        scripts & {"CYRILLIC", "GREEK"}
        and letters
        and all(char in LATIN_LOOKALIKES for char in letters)
    ):
        raise InvalidURL(
            f"host {host!r} spells a Latin-looking name in look-alike letters "
            "(IDN homograph)",
            fix="write the host in Latin letters if that is what it is",
        )
