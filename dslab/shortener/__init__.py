"""The URL shortener: validation, codes, the Redis store, near cache, visits
and the aiohttp server. The CLI builds on these names; nothing here imports
the CLI.

    from dslab.shortener import LinkStore, validate_url, start_server
"""

from dslab.shortener.codes import DEFAULT_CODE_LENGTH, code_space, new_code
from dslab.shortener.errors import (
    AliasTaken,
    CodeSpaceExhausted,
    InvalidAlias,
    InvalidURL,
    LinkGone,
    LinkNotFound,
    ShortenerRefusal,
    ShortenerUnavailable,
    StoreUnavailable,
)
from dslab.shortener.server import (
    RunningServer,
    ShortenerConfig,
    build_app,
    start_server,
)
from dslab.shortener.store import Created, Link, LinkInfo, LinkStore
from dslab.shortener.validation import validate_alias, validate_url

__all__ = [
    "DEFAULT_CODE_LENGTH",
    "AliasTaken",
    "CodeSpaceExhausted",
    "Created",
    "InvalidAlias",
    "InvalidURL",
    "Link",
    "LinkGone",
    "LinkInfo",
    "LinkNotFound",
    "LinkStore",
    "RunningServer",
    "ShortenerConfig",
    "ShortenerRefusal",
    "ShortenerUnavailable",
    "StoreUnavailable",
    "build_app",
    "code_space",
    "new_code",
    "start_server",
    "validate_alias",
    "validate_url",
]
