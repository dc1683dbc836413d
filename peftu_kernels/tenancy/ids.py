"""User ids and the folder names they map to.

Any non-empty string of valid Unicode is a user id (a lone surrogate, which no file, JSON text or HTTP
request can carry as text, is refused). On disk an id becomes one folder name that cannot name anything
but a child of its store: bytes outside [a-z0-9_-] are written as %xx (lowercase hex, so two ids never map
to names that a case-insensitive file system would confuse), which leaves no '/', '.', '..' or NUL. An
encoding too long for a file name keeps a readable head and a SHA-256 of the whole id after '~' (a
character the encoding never emits); the store keeps the id itself in the folder's manifest for those.
"""
from __future__ import annotations

import hashlib

_SAFE = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")
_HEX = frozenset("0123456789abcdef")
_MAX = 150  # bytes; file systems allow 255, and the store adds a prefix for temporary names


def check_id(user, what: str = "user id") -> str:
    if not isinstance(user, str):
        raise TypeError(f"{what} must be a str, got {type(user).__name__} {user!r}")
    if not user:
        raise ValueError(f"{what} must be a non-empty string")
    try:
        user.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} {user!r} is not valid Unicode (a lone surrogate at index {e.start})") from None
    return user


def _raw(user: str) -> bytes:
    return user.encode("utf-8", "surrogatepass")  # lone surrogates are still distinct ids


def folder_name(user: str) -> str:
    """The folder name of `user` (injective: two ids never share a name)."""
    check_id(user)
    out = "".join(c if c in _SAFE else "".join(f"%{b:02x}" for b in c.encode("utf-8", "surrogatepass"))
                  for c in user)
    if len(out) <= _MAX:
        return out
    head = out[:_MAX - 66]
    head = head[:head.rfind("%")] if "%" in head[-2:] else head  # never cut inside a %xx
    return f"{head}~{hashlib.sha256(_raw(user)).hexdigest()}"


def user_of(name: str) -> str | None:
    """The id a folder name encodes, or None when it is a hashed (long-id) name or not one of ours."""
    if "~" in name:
        return None
    raw, i = bytearray(), 0
    while i < len(name):
        if name[i] == "%":
            h = name[i + 1:i + 3]
            if len(h) != 2 or not set(h) <= _HEX:
                return None
            raw.append(int(h, 16))
            i += 3
        elif name[i] in _SAFE:
            raw += name[i].encode()
            i += 1
        else:
            return None
    try:
        user = raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return None
    return user if user and folder_name(user) == name else None
