"""python -m bench_suite.data fetch [--tasks a,b] [--data-dir DIR]: every corpus from its public release.

Each file (sources.py) is downloaded into `<file>.part` -- a killed download continues from there with an
HTTP Range request, or restarts cleanly when the server ignores ranges -- then checked against its pinned
checksums (git blob SHA-1, SHA-256, or the hub's SHA-256 for Hugging Face files) and only then renamed into
place, so a file appears only complete and verified. A file already in the data root (plain or .gz) is left
alone. One file's failure (HTTP status, checksum mismatch, network) is reported and the others go on; a
summary table ends the run and `fetch.lock.json` records what was fetched from where.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from peftu_kernels.io import atomic_write
from peftu_kernels.progress import progress

from . import ALL_TASKS
from .core import DataError, MissingData
from .sources import SOURCES, Source

GITHUB_RAW = "https://raw.githubusercontent.com"
CHUNK = 1 << 20


class FetchError(RuntimeError):
    pass


@dataclass
class Outcome:
    source: Source
    state: str            # fetched | present | failed | manual
    detail: str = ""
    size: int = 0


def digests(path: Path) -> dict[str, str]:
    """SHA-256 and git blob SHA-1 of a file (one read)."""
    size = path.stat().st_size
    sha, blob = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
            blob.update(chunk)
    return {"sha256": sha.hexdigest(), "git_blob": blob.hexdigest()}


def verify(path: Path, src: Source, sha256: str | None = None) -> dict[str, str]:
    d = digests(path)
    for name, want in (("sha256", sha256 or src.sha256), ("git_blob", src.git_blob)):
        if want and d[name] != want:
            raise FetchError(f"checksum mismatch: {name} expected {want}, got {d[name]}; the download was not kept")
    return d


def _download(url: str, part: Path, bar_name: str, show: bool) -> None:
    """Into `part`, continuing it when it exists and the server honours Range."""
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "peftu-fetch", **({"Range": f"bytes={have}-"} if have else {})})
    try:
        resp = urllib.request.urlopen(req, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the part is complete or stale: start again
            part.unlink()
            return _download(url, part, bar_name, show)
        raise FetchError(f"HTTP {e.code} {e.reason} for {url}") from None
    except (urllib.error.URLError, OSError) as e:
        raise FetchError(f"network error for {url}: {getattr(e, 'reason', e)}") from None
    with resp:
        resumed = have and resp.status == 206
        total = int(resp.headers.get("Content-Length") or 0) + (have if resumed else 0)
        bar = progress(total or 1, bar_name, show)
        bar.update(have if resumed else 0)
        with open(part, "ab" if resumed else "wb") as f:
            try:
                while chunk := resp.read1(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
            except (http.client.IncompleteRead, OSError) as e:
                raise FetchError(f"download of {url} was cut off after {f.tell()} bytes ({type(e).__name__}); "
                                 f"run again to continue") from None
            finally:
                f.flush()
                os.fsync(f.fileno())
                bar.close()
        if total and part.stat().st_size != total:
            raise FetchError(f"download of {url} was cut off at {part.stat().st_size} of {total} bytes; run again "
                             f"to continue")


def _hub(src: Source, tmp: Path, endpoint: str | None) -> tuple[Path, str, str]:
    """(downloaded file, its SHA-256 by the hub, the resolved revision) via huggingface_hub."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError
    repo, name, rev = src.hf
    try:
        meta = get_hf_file_metadata(hf_hub_url(repo, name, repo_type="dataset", revision=rev, endpoint=endpoint))
        path = hf_hub_download(repo, name, repo_type="dataset", revision=rev, local_dir=tmp, endpoint=endpoint)
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", "?")
        hint = " (a gated dataset: accept its terms on the hub and log in with `hf auth login`)" if status in (401, 403) else ""
        raise FetchError(f"HTTP {status} from the hub for {repo}/{name}{hint}") from None
    except OSError as e:
        raise FetchError(f"hub download of {repo}/{name} failed: {e}") from None
    etag = (meta.etag or "").strip('"')
    return Path(path), etag if len(etag) == 64 else None, meta.commit_hash or rev


def fetch_one(root: Path, src: Source, github: str = GITHUB_RAW, hub_endpoint: str | None = None,
              show: bool = True) -> tuple[Outcome, dict | None]:
    dest = root / src.dest
    if dest.exists() or dest.with_name(dest.name + ".gz").exists():
        return Outcome(src, "present"), None
    if src.manual:
        return Outcome(src, "manual", src.manual), None
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        if src.github:
            repo, rev, path = src.github
            url = f"{github}/{repo}/{rev}/{path}"
            _download(url, part, dest.name, show)
            d = verify(part, src)
            lock = {"url": url, "revision": rev, **d}
        else:
            tmp = root / ".fetch-tmp"
            got, sha, rev = _hub(src, tmp, hub_endpoint)
            shutil.move(str(got), part)
            shutil.rmtree(tmp, ignore_errors=True)
            d = verify(part, src, sha)
            lock = {"hub": f"datasets/{src.hf[0]}/{src.hf[1]}", "revision": rev, **d}
    except FetchError as e:
        if "checksum mismatch" in str(e):
            part.unlink(missing_ok=True)  # never keep bytes that failed their check
        return Outcome(src, "failed", str(e)), None
    os.replace(part, dest)  # the file appears only now, whole and verified
    return Outcome(src, "fetched", src.where, dest.stat().st_size), {src.dest: lock}


def fetch(root, tasks: list[str] | None = None, sources=None, github: str = GITHUB_RAW,
          hub_endpoint: str | None = None, show: bool = True) -> list[Outcome]:
    root = Path(root)
    want = [s for s in (sources if sources is not None else SOURCES) if tasks is None or set(s.tasks) & set(tasks)]
    out, locks = [], {}
    for s in want:
        o, lock = fetch_one(root, s, github, hub_endpoint, show)
        out.append(o)
        if lock:
            locks.update(lock)
    if locks:
        lf = root / "fetch.lock.json"
        old = json.loads(lf.read_text()) if lf.is_file() else {}
        atomic_write(lf, lambda tmp: Path(tmp).write_text(json.dumps({**old, **locks}, indent=2, sort_keys=True)))
    return out


def summary(outcomes: list[Outcome]) -> str:
    lines = ["| task(s) | file | state | detail |", "|---|---|---|---|"]
    for o in outcomes:
        tasks = ",".join(o.source.tasks) if len(o.source.tasks) < 3 else f"{o.source.tasks[0]} (+{len(o.source.tasks) - 1})"
        size = f" ({o.size / 1e6:.1f} MB)" if o.size else ""
        lines.append(f"| {tasks} | {Path(o.source.dest).name} | {o.state}{size} | {o.detail} |")
    n = {k: sum(o.state == k for o in outcomes) for k in ("fetched", "present", "failed", "manual")}
    lines.append(f"\n{n['fetched']} fetched, {n['present']} already present, {n['failed']} failed, "
                 f"{n['manual']} to get by hand")
    return "\n".join(lines)


def missing_table(loaded: dict, root, verbose: bool = False) -> str:
    """A short table of the tasks that cannot run and why, and the one command that fetches their data."""
    bad = {n: e for n, e in loaded.items() if isinstance(e, (MissingData, DataError))}
    if not bad:
        return ""
    lines = ["| task | state | what is missing or wrong |", "|---|---|---|"]
    for n, e in bad.items():
        # a corrupt file: its path and the problem (DataError names both), so the run says which file to replace
        what = ", ".join(getattr(e, "files", [])) if isinstance(e, MissingData) else str(e).replace("|", "/")
        lines.append(f"| {n} | {'missing' if isinstance(e, MissingData) else 'corrupt'} | {what} |")
    some = f" --tasks {','.join(bad)}" if len(bad) < len(ALL_TASKS) else ""
    lines.append(f"\nget them with: python -m bench_suite.data fetch --data-dir {root}{some}"
                 + ("" if verbose else "   (details: --verbose)"))
    if verbose:
        lines += [f"- {n}: {e}" for n, e in bad.items()]
    return "\n".join(lines)
