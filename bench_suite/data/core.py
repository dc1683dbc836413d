"""The common data model: user -> sample id -> {"text", "label": [str, ...]}, plus the task's metadata."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

Users = dict[str, dict[str, dict]]


class DataError(ValueError):
    """Malformed input: the message names the file, the row and the problem."""


class MissingData(FileNotFoundError):
    """A corpus whose files are absent: the message names the files and where the public release is;
    `files` holds their names (for short reports)."""

    def __init__(self, msg: str, files: list[str] | None = None):
        super().__init__(msg)
        self.files = files or []


@dataclass
class Task:
    name: str
    labels: list[str]              # config label list (order matters for the metric)
    instruction: str
    users: Users
    multi_label: bool = False
    partial: str | None = None     # why the task is incomplete here, or None when it is the full corpus
    source: str = ""
    extra: bool = False            # not one of PEFT-U's 13 tasks (LeWiDi)

    @property
    def n_annotations(self) -> int:
        return sum(len(s) for s in self.users.values())


def data_root(arg=None) -> Path:
    """--data-dir, else $PEFTU_DATA, else ../shared/data beside the checkout."""
    if arg:
        return Path(arg)
    if os.environ.get("PEFTU_DATA"):
        return Path(os.environ["PEFTU_DATA"])
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def put(users: Users, user, sid, text: str, labels: list[str], keep_first: bool) -> None:
    """Store one annotation; empty label lists are never stored. keep_first: the first rating of a
    (user, sample) wins (goemotion, studemo, unhealthy, wikidetox); otherwise a later row overwrites."""
    if not labels:
        return
    u = users.setdefault(str(user), {})
    sid = str(sid)
    if keep_first and sid in u:
        return
    u[sid] = {"text": text, "label": list(labels)}
