"""Where a credential may not be: the one rule for names, URLs and config keys.

A credential reaches a stage only from its environment (a Kubernetes Secret in a pod).
Rather than list the credential names we know of, which misses the next one, any variable
whose name contains one of these words is taken to carry one, whatever its case; so is
any variable a stage config names as holding a key (``api_key_env``), whatever its name.
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import parse_qsl, urlsplit

WORDS = ("key", "token", "secret", "passw", "auth", "credential", "private")
# Query parameters that carry a credential without saying so (Azure SAS, Functions).
QUERY_WORDS = ("sig", "signature", "code", "pwd")
# Well-known settings that contain such a word and hold none.
PLAIN = ("TOKENIZERS_PARALLELISM",)


def _any_case(word: str) -> str:
    # JSON schema's regular expressions have no flags in every engine (Helm's is Go's):
    # case-insensitivity spelled out as classes works in all of them.
    return "".join(f"[{c.upper()}{c.lower()}]" for c in word)


# Searched (not anchored) in a variable's name, in Python and in the charts' schema.
SECRET_NAME = "(" + "|".join(_any_case(word) for word in WORDS) + ")"


def secret_name(name: str) -> bool:
    """Whether a variable called ``name`` must never be given a literal value."""
    return name not in PLAIN and re.search(SECRET_NAME, name) is not None


def key_env_names(config: Any) -> set[str]:
    """The variables a stage config names as holding a key: the values of its ``*_env``
    fields, at any depth (``judge.endpoint.api_key_env``)."""
    found: set[str] = set()
    if isinstance(config, dict):
        for field, value in config.items():
            if isinstance(value, str) and str(field).endswith("_env"):
                found.add(value)
            else:
                found |= key_env_names(value)
    elif isinstance(config, list):
        for item in config:
            found |= key_env_names(item)
    return found


def check_url(url: str) -> str:
    """``url`` unchanged, or ValueError when it carries a credential: user information
    (``https://user:pass@host``) or a key-like query parameter (``?api_key=...``)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("the URL must be http:// or https:// with a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            "the URL carries user information (user:password@); give the credential "
            "through the environment (a Secret) instead"
        )
    for name, _ in parse_qsl(parts.query, keep_blank_values=True) + parse_qsl(parts.fragment):
        if secret_name(name) or name.lower() in QUERY_WORDS:
            raise ValueError(
                f"the URL's query parameter {name!r} looks like a credential; give it "
                "through the environment (a Secret) instead"
            )
    return url


# The same two rules as patterns, for the charts' schema.
URL_WITH_USER = "^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@"
URL_WITH_KEY = (
    "[?&#]([^=&#]*"
    + SECRET_NAME
    + "[^=&#]*|"
    + "|".join(_any_case(word) for word in QUERY_WORDS)
    + ")="
)
URL_HTTP = "^([Hh][Tt][Tt][Pp][Ss]?://.+)?$"  # or empty


def redact(text: str) -> str:
    """``text`` (a client's error message) as it may be printed: the values of this
    process's secret-named variables and a URL's user information replaced by ***."""
    for name, value in os.environ.items():
        if len(value) >= 8 and secret_name(name):  # shorter ones are words, not keys
            text = text.replace(value, "***")
    return re.sub(r"(://)[^/?#\s@]*@", r"\1***@", text)
