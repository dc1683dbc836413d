"""API keys and tenants: which users a key may call, whether it may manage adapters, whether it may read
/metrics.

    --api-key KEY (or PEFTU_API_KEY): one key for everything (every user, managing, /metrics)
    --api-keys FILE: tenants, a JSON object
      {"open": ["/health"],                        # routes answered without a key (default: /health only)
       "keys": [{"name": "tenant-a", "key": "...",  # or "sha256": hex digest of the key, so the file holds no key
                 "users": ["alice", "team-a-*"],    # exact ids or fnmatch patterns ("*": every user)
                 "manage": false, "metrics": false}]}

A key is sent as `Authorization: Bearer KEY` (what the openai SDK sends). Keys are at least MIN_KEY characters.
Checking a key hashes it (SHA-256) and compares the digest with every tenant's in constant time
(hmac.compare_digest, no early exit), so timing tells nothing of which key or how much of it matched. Keys are
never logged or echoed: messages name tenants, never keys. The base model holds no tenant's data: any valid key
may call it.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

MIN_KEY = 16
# the answers every front end gives (the single-process server and the Ray Serve ingress)
UNAUTHENTICATED = "missing or invalid API key (send Authorization: Bearer KEY)"


def denied(what: str) -> str:
    return f"this API key may not {what}"
ROUTES_OPENABLE = ("/health", "/metrics")


class KeyFileError(ValueError):
    """The key file cannot be used; the message says which file, entry and field (never a key)."""


@dataclass(frozen=True)
class Tenant:
    name: str
    users: tuple[str, ...]
    manage: bool = False
    metrics: bool = False

    def may_call(self, user: str | None) -> bool:
        """user None: the base model."""
        return user is None or any(fnmatchcase(user, p) for p in self.users)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class Keys:
    def __init__(self, entries: list[tuple[bytes, Tenant]], open_routes=("/health",)):
        self._entries = list(entries)
        self.open = frozenset(open_routes)

    def __repr__(self) -> str:  # never the digests
        return f"Keys({len(self._entries)} tenants: {', '.join(t.name for _, t in self._entries)}; open {sorted(self.open)})"

    @classmethod
    def single(cls, key: str) -> "Keys":
        if not isinstance(key, str) or len(key) < MIN_KEY:
            raise KeyFileError(f"the API key must have at least {MIN_KEY} characters")
        return cls([(_digest(key), Tenant("admin", ("*",), manage=True, metrics=True))])

    @classmethod
    def from_file(cls, path) -> "Keys":
        where = f"API key file {str(path)!r}"
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise KeyFileError(f"{where} cannot be read ({type(e).__name__})") from None
        except json.JSONDecodeError as e:
            raise KeyFileError(f"{where} is not JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        if not isinstance(data, dict) or set(data) - {"keys", "open"} or "keys" not in data:
            raise KeyFileError(f"{where}: expected an object with \"keys\" (a list) and optionally \"open\"")
        open_routes = data.get("open", ["/health"])
        if not isinstance(open_routes, list) or not all(r in ROUTES_OPENABLE for r in open_routes):
            raise KeyFileError(f"{where}: \"open\" must be a list of routes among {list(ROUTES_OPENABLE)}")
        if not isinstance(data["keys"], list) or not data["keys"]:
            raise KeyFileError(f"{where}: \"keys\" must be a non-empty list")
        entries, names, digests = [], set(), set()
        for i, e in enumerate(data["keys"]):
            at = f"{where}, keys[{i}]"
            if not isinstance(e, dict):
                raise KeyFileError(f"{at}: expected an object")
            extra = set(e) - {"name", "key", "sha256", "users", "manage", "metrics"}
            if extra:
                raise KeyFileError(f"{at}: unknown fields {sorted(extra)}")
            name = e.get("name")
            if not isinstance(name, str) or not name or name in names:
                raise KeyFileError(f"{at}: \"name\" must be a non-empty string, unique in the file")
            if ("key" in e) == ("sha256" in e):
                raise KeyFileError(f"{at} ({name}): give exactly one of \"key\" and \"sha256\"")
            if "key" in e:
                if not isinstance(e["key"], str) or len(e["key"]) < MIN_KEY:
                    raise KeyFileError(f"{at} ({name}): \"key\" must be a string of at least {MIN_KEY} characters")
                d = _digest(e["key"])
            else:
                h = e["sha256"]
                if not isinstance(h, str) or len(h) != 64 or set(h.lower()) - set("0123456789abcdef"):
                    raise KeyFileError(f"{at} ({name}): \"sha256\" must be 64 hex digits")
                d = bytes.fromhex(h)
            if d in digests:
                raise KeyFileError(f"{at} ({name}): the same key as an earlier entry")
            users = e.get("users", [])
            if not isinstance(users, list) or not all(isinstance(u, str) and u for u in users):
                raise KeyFileError(f"{at} ({name}): \"users\" must be a list of non-empty strings (ids or patterns)")
            for flag in ("manage", "metrics"):
                if not isinstance(e.get(flag, False), bool):
                    raise KeyFileError(f"{at} ({name}): \"{flag}\" must be true or false")
            names.add(name)
            digests.add(d)
            entries.append((d, Tenant(name, tuple(users), e.get("manage", False), e.get("metrics", False))))
        return cls(entries, open_routes)

    def who(self, presented: str | None) -> Tenant | None:
        """The tenant whose key this is, or None. Compares with every entry (constant time in the key)."""
        if not presented:
            return None
        d, found = _digest(presented), None
        for digest, tenant in self._entries:
            if hmac.compare_digest(d, digest):
                found = tenant
        return found


def from_options(api_key: str | None, api_keys: str | None) -> Keys | None:
    """The server's keys from its options (--api-keys FILE, else --api-key / PEFTU_API_KEY), None: open."""
    if api_keys:
        if api_key:
            raise KeyFileError("give either --api-key (one key) or --api-keys (a file of tenants), not both")
        return Keys.from_file(api_keys)
    key = api_key or os.environ.get("PEFTU_API_KEY")
    return Keys.single(key) if key else None


def bearer(header: str | None) -> str | None:
    """The key in an Authorization header ("Bearer KEY"), or None."""
    if not header:
        return None
    scheme, _, key = header.partition(" ")
    return key.strip() or None if scheme.lower() == "bearer" else None
