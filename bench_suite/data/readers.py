"""Readers for the raw forms: (gzipped) CSV/TSV/JSON, tar members, parquet, with errors that name the file."""
from __future__ import annotations

import csv
import gzip
import io
import json
import sys
import tarfile
import zlib
from pathlib import Path

from .core import DataError

csv.field_size_limit(sys.maxsize)


def open_text(path: Path):
    path = Path(path)
    try:
        if path.suffix == ".gz":
            return io.TextIOWrapper(gzip.open(path), encoding="utf-8", newline="")
        return open(path, encoding="utf-8", newline="")
    except OSError as e:
        raise DataError(f"{path}: unreadable ({e})") from e


def rows(path: Path, delimiter: str = ",", header: bool = True, required: list[str] | None = None,
         min_cols: int = 0, drop_truncated_last: bool = False):
    """Yield (row number, row) -- dict rows when header, else lists. A missing column raises DataError."""
    try:
        with open_text(path) as f:
            reader = csv.reader(f, delimiter=delimiter)
            head = next(reader) if header else None
            if head is not None and required:
                miss = [c for c in required if c not in head]
                if miss:
                    raise DataError(f"{path}: missing column(s) {miss} (header has {head[:12]}...)")
            items = list(enumerate(reader, start=2 if header else 1))
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
    if drop_truncated_last and items and head is not None and len(items[-1][1]) != len(head):
        items.pop()
    for n, r in items:
        if head is not None:
            if len(r) != len(head):
                raise DataError(f"{path}: row {n} has {len(r)} fields, the header has {len(head)}")
            yield n, dict(zip(head, r))
        else:
            if len(r) < min_cols:
                raise DataError(f"{path}: row {n} has {len(r)} fields, need at least {min_cols}")
            yield n, r


def load_json(path: Path, lines: bool = False):
    try:
        with open_text(path) as f:
            return [json.loads(x) for x in f if x.strip()] if lines else json.load(f)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable JSON ({type(e).__name__}: {e})") from e


def tar_member(path: Path, name: str) -> io.StringIO:
    try:
        with tarfile.open(path) as t:
            m = next((m for m in t.getmembers() if m.name.split("/")[-1] == name), None)
            if m is None:
                raise DataError(f"{path}: archive has no member {name}")
            return io.StringIO(t.extractfile(m).read().decode("utf-8"))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: unreadable archive ({e})") from e


def parquet_rows(path: Path, columns: list[str]):
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from e
    try:
        table = pq.read_table(path)
    except Exception as e:
        raise DataError(f"{path}: unreadable parquet ({e})") from e
    miss = [c for c in columns if c not in table.column_names]
    if miss:
        raise DataError(f"{path}: missing column(s) {miss}")
    cols = {c: table.column(c).to_pylist() for c in columns}
    for i in range(table.num_rows):
        yield i, {c: cols[c][i] for c in columns}
