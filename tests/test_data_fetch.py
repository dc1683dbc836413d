"""The fetch command, run for real against a local HTTP server (GitHub-raw paths and a hub-style endpoint for
huggingface_hub) serving small files in each release's format; and the pinned checksums against the copies
in the shared data root."""
import gzip
import hashlib
import io
import json
from pathlib import Path

import pytest

from bench_suite.data import ALL_TASKS, MissingData, available, load_task
from bench_suite.data.core import data_root
from bench_suite.data.fetch import digests, fetch, summary
from bench_suite.data.sources import SOURCES, Source
from fetch_server import Files, serve

TWEETEVAL = ("id,text,label_M_1,label_F_2\n1,you are great,Non-hateful,Non-hateful\n"
             "2,go away you,Hateful,Non-hateful\n3,nice day,Non-hateful,Hateful\n").encode()


def lewidi(split):
    items = {str(i): {"text": f"tweet {split} {i}", "annotations": "1,0,1", "annotators": "Ann1,Ann2,Ann3"}
             for i in range(3)}
    return json.dumps(items).encode()


def parquet():
    import pyarrow as pa
    import pyarrow.parquet as pq
    t = pa.table({"comment_id": [1, 1, 2], "annotator_id": [7, 8, 7], "text": ["a b", "a b", "c d"],
                  "hatespeech": [0.0, 2.0, 1.0]})
    buf = io.BytesIO()
    pq.write_table(t, buf)
    return buf.getvalue()


def git_blob(b: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(b) + b).hexdigest()


@pytest.fixture
def world():
    files = Files()
    srv, base = serve(files)
    bodies = {"peftu/raw/tweeteval/annotations_g3.csv": TWEETEVAL,
              **{f"lewidi/raw/HS-Brexit/HS-Brexit_{sp}.json": lewidi(sp) for sp in ("dev", "test", "train")}}
    sources = []
    for dest, body in bodies.items():
        path = f"data/{Path(dest).name}"
        files.files[f"/org/repo/{'a' * 40}/{path}"] = body
        sources.append(Source(dest, ("tweeteval",) if "tweeteval" in dest else ("hs_brexit",),
                              github=("org/repo", "a" * 40, path), git_blob=git_blob(body),
                              sha256=hashlib.sha256(body).hexdigest()))
    pq_bytes = parquet()
    files.files["/datasets/org/mhs/resolve/main/measuring-hate-speech.parquet"] = pq_bytes
    sources.append(Source("peftu/raw/measuringhatespeech/measuring-hate-speech.parquet", ("measuringhatespeech",),
                          hf=("org/mhs", "measuring-hate-speech.parquet", "main")))
    yield files, base, sources
    srv.shutdown()


def run(root, world, **kw):
    files, base, sources = world
    return fetch(root, sources=kw.pop("sources", sources), github=base, hub_endpoint=base, show=False, **kw)


def test_full_fetch_then_the_loaders_read_it_and_a_second_run_downloads_nothing(tmp_path, world):
    files = world[0]
    out = run(tmp_path, world)
    assert [o.state for o in out] == ["fetched"] * 5, summary(out)
    t = load_task("tweeteval", tmp_path)
    assert len(t.users) == 2 and t.n_annotations == 6
    assert load_task("hs_brexit", tmp_path).n_annotations == 27
    assert load_task("measuringhatespeech", tmp_path).n_annotations == 3
    lock = json.loads((tmp_path / "fetch.lock.json").read_text())
    assert set(lock) == {s.dest for s in world[2]} and lock[world[2][-1].dest]["revision"] == "c" * 40
    assert not list(tmp_path.rglob("*.part")) and not (tmp_path / ".fetch-tmp").exists()
    n = len(files.gets)
    again = run(tmp_path, world)
    assert [o.state for o in again] == ["present"] * 5 and len(files.gets) == n
    assert "0 fetched, 5 already present, 0 failed" in summary(again)


def test_a_killed_download_resumes_from_its_part(tmp_path, world):
    files, base, sources = world
    key = next(k for k in files.files if k.endswith("annotations_g3.csv"))
    files.cut.add(key)
    first = run(tmp_path, world, tasks=["tweeteval"])
    assert first[0].state == "failed" and "cut off" in first[0].detail
    part = tmp_path / "peftu/raw/tweeteval/annotations_g3.csv.part"
    assert 0 < part.stat().st_size < len(TWEETEVAL) and not part.with_suffix("").exists()
    second = run(tmp_path, world, tasks=["tweeteval"])
    assert second[0].state == "fetched" and files.ranges == [f"bytes={len(TWEETEVAL) // 2}-"]
    assert (tmp_path / "peftu/raw/tweeteval/annotations_g3.csv").read_bytes() == TWEETEVAL and not part.exists()


def test_a_checksum_mismatch_keeps_nothing_and_names_the_file(tmp_path, world):
    files, base, sources = world
    key = next(k for k in files.files if k.endswith("HS-Brexit_dev.json"))
    files.files[key] = files.files[key].replace(b"tweet", b"tweeT")
    out = run(tmp_path, world)
    bad = next(o for o in out if o.source.dest.endswith("HS-Brexit_dev.json"))
    assert bad.state == "failed" and "checksum mismatch" in bad.detail
    assert not list((tmp_path / "lewidi/raw/HS-Brexit").glob("HS-Brexit_dev*"))
    assert sum(o.state == "fetched" for o in out) == 4
    assert "HS-Brexit_dev.json | failed" in summary(out)


def test_a_404_fails_that_file_only(tmp_path, world):
    files, base, sources = world
    del files.files[next(k for k in files.files if k.endswith("HS-Brexit_test.json"))]
    out = run(tmp_path, world)
    bad = next(o for o in out if o.source.dest.endswith("HS-Brexit_test.json"))
    assert bad.state == "failed" and "HTTP 404" in bad.detail
    assert [o.state for o in out if o is not bad] == ["fetched"] * 4
    del files.files["/datasets/org/mhs/resolve/main/measuring-hate-speech.parquet"]
    hub = run(tmp_path / "b", world, tasks=["measuringhatespeech"])
    assert hub[0].state == "failed" and "404" in hub[0].detail


def test_run_on_an_empty_root_prints_a_short_table_and_the_command(tmp_path, capsys):
    from bench_suite import run as bench
    with pytest.raises(SystemExit) as e:
        bench.main(["--data-dir", str(tmp_path), "--tasks", "tweeteval,epic", "--out", str(tmp_path / "o")])
    msg = str(e.value.code)
    assert e.value.code != 0 and "| tweeteval | missing | annotations_g3.csv |" in msg
    assert f"python -m bench_suite.data fetch --data-dir {tmp_path} --tasks tweeteval,epic" in msg
    assert len(msg) < 1000


def test_every_task_has_sources_for_the_files_its_loader_asks_for(tmp_path):
    names = {}
    for s in SOURCES:
        for t in s.tasks:
            names.setdefault(t, set()).add(Path(s.dest).name)
    for t, e in available(tmp_path).items():
        assert isinstance(e, MissingData), t
        assert set(e.files) <= names.get(t, set()), (t, e.files)
    assert set(names) == set(ALL_TASKS)


def test_pinned_checksums_match_the_shared_copies():
    """The manifest's SHA-256 and git blob ids, checked against the files in the shared data root (their .gz
    copies were made from the unmodified upstream files)."""
    root, checked = data_root(), 0
    for s in SOURCES:
        p = root / s.dest
        gz = p.with_name(p.name + ".gz")
        if not p.exists() and gz.exists() and not s.dest.endswith(".gz"):
            raw = gzip.decompress(gz.read_bytes())
            d = {"sha256": hashlib.sha256(raw).hexdigest(), "git_blob": git_blob(raw)}
        elif p.exists():
            d = digests(p)
        else:
            continue
        for k in ("sha256", "git_blob"):
            if getattr(s, k):
                assert d[k] == getattr(s, k), (s.dest, k)
                checked += 1
    if checked == 0:
        pytest.skip(f"no shared data at {root}")
    assert checked >= 15
