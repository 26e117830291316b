"""The Files API through the official client against a real server on 127.0.0.1 (a tiny model, so
it starts fast): uploads, pagination, content, delete, the size limit, a cut-off upload leaving
nothing behind, and files surviving a restart. FileStore's atomic writes as unit tests first."""

from __future__ import annotations

import socket
import time

import httpx
import openai
import pytest
from conftest import ServerProcess
from tuning_data import tiny_chat_llama

from fundament.errors import PayloadTooLargeError
from fundament.jobs.files import FileStore
from fundament.jobs.store import JobStore

LIMIT = 64 * 1024


# ---- FileStore ----------------------------------------------------------------------------------


def test_upload_commits_atomically_and_abort_leaves_nothing(tmp_path):
    files = FileStore(JobStore(tmp_path / "db.sqlite3"), tmp_path / "files", max_bytes=10)
    up = files.begin()
    up.write(b"hello")
    assert [p.name for p in files.dir.iterdir()] == [up.tmp.name]  # bytes go to a temp file beside the final one
    row = up.commit("a.txt", "user_data")
    assert (row["bytes"], row["filename"], row["purpose"], row["status"]) == (5, "a.txt", "user_data", "processed")
    assert [p.name for p in files.dir.iterdir()] == [row["id"]] and files.read(row["id"]) == b"hello"
    up = files.begin()
    up.write(b"12345")
    with pytest.raises(PayloadTooLargeError):
        up.write(b"678901")
    assert [p.name for p in files.dir.iterdir()] == [row["id"]]  # the over-limit upload left nothing
    assert [r["id"] for r in files.store.list_files()[0]] == [row["id"]]


def test_sweep_removes_leftovers_of_killed_processes_only(tmp_path):
    files = FileStore(JobStore(tmp_path / "db.sqlite3"), tmp_path / "files")
    kept = files.add_bytes(b"x", "k.txt", "user_data")["id"]
    (files.dir / ".tmp-file-dead").write_bytes(b"half")
    (files.dir / "file-norow").write_bytes(b"renamed, then killed before its row")
    fresh = files.begin()  # an upload in progress right now
    fresh.write(b"in flight")
    assert files.sweep(min_age_s=60) == []  # too young: could be another process's write
    assert sorted(files.sweep(min_age_s=0)) == sorted([".tmp-file-dead", "file-norow", fresh.tmp.name])
    assert [p.name for p in files.dir.iterdir()] == [kept]


# ---- the HTTP API -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    tiny = tiny_chat_llama(tmp_path_factory.getbasetemp())
    home = tmp_path_factory.mktemp("files-home")
    srv = ServerProcess(
        ["--no-default-models", "--model", str(tiny), "--max-file-bytes", str(LIMIT), "--no-worker"], home
    )
    srv.home = home
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def fc(tiny_server):
    return openai.OpenAI(base_url=tiny_server.base_url, api_key="x", max_retries=0, timeout=30)


def err(e: openai.APIStatusError, status: int, param):
    assert e.status_code == status, e.response.text
    body = e.response.json()["error"]
    assert body["param"] == param and body["message"], body
    return body


def test_upload_retrieve_content_delete(fc, tiny_server):
    data = b'{"prompt": "a", "completion": "b"}\n' * 3
    f = fc.files.create(file=("train.jsonl", data), purpose="fine-tune")
    assert f.id.startswith("file-") and f.object == "file"
    assert (f.bytes, f.filename, f.purpose, f.status) == (len(data), "train.jsonl", "fine-tune", "processed")
    assert abs(f.created_at - time.time()) < 60
    assert fc.files.retrieve(f.id) == f
    assert fc.files.content(f.id).content == data
    assert (tiny_server.home / "files" / f.id).read_bytes() == data
    d = fc.files.delete(f.id)
    assert (d.id, d.object, d.deleted) == (f.id, "file", True)
    assert not (tiny_server.home / "files" / f.id).exists()
    for call in (lambda: fc.files.retrieve(f.id), lambda: fc.files.content(f.id), lambda: fc.files.delete(f.id)):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        err(e.value, 404, "file_id")


def test_list_pages_with_has_more_and_auto_pagination(fc):
    ids = [
        fc.files.create(file=(f"p{i}.txt", b"x" * (i + 1)), purpose="user_data" if i < 5 else "batch").id
        for i in range(7)
    ]
    page = fc.files.list(limit=2, purpose="user_data")
    assert [f.id for f in page.data] == ids[4:2:-1] and page.has_more
    raw = httpx.get(f"{fc.base_url}files", params={"limit": 2, "purpose": "user_data"}).json()
    assert (raw["object"], raw["first_id"], raw["last_id"], raw["has_more"]) == ("list", ids[4], ids[3], True)
    assert [f.id for f in fc.files.list(limit=2, purpose="user_data")] == ids[4::-1]  # the client follows `after`
    assert [f.id for f in fc.files.list(limit=3, order="asc", purpose="user_data")] == ids[:5]
    last = fc.files.list(limit=5, purpose="user_data", after=ids[1])
    assert [f.id for f in last.data] == [ids[0]] and not last.has_more
    assert [f.id for f in fc.files.list(purpose="batch")] == ids[:4:-1]


@pytest.mark.parametrize(
    "files,data,param",
    [
        ({"file": ("a.jsonl", b"{}")}, {"purpose": "assistants"}, "purpose"),
        ({"file": ("a.jsonl", b"{}")}, {}, "purpose"),
        (None, {"purpose": "fine-tune"}, "file"),
        ({"file": ("a.jsonl", b"")}, {"purpose": "fine-tune"}, "file"),
    ],
)
def test_bad_uploads_are_400_with_param(tiny_server, files, data, param):
    r = (
        httpx.post(f"{tiny_server.base_url}/files", files=files, data=data)
        if files
        else httpx.post(f"{tiny_server.base_url}/files", data=data, files={"other": ("x", b"y")})
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    r = httpx.post(f"{tiny_server.base_url}/files", json={"purpose": "fine-tune"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"


def test_malformed_multipart_is_400_and_stores_nothing(fc, tiny_server):
    before = {f.id for f in fc.files.list()}
    part = 'Content-Disposition: form-data; name="{}"{}\r\n\r\n'
    bodies = [
        b"no boundary anywhere",
        # a complete body but for its closing boundary: the file may be cut short
        f"--xyz\r\n{part.format('purpose', '')}fine-tune\r\n--xyz\r\n{part.format('file', '; filename=a')}hello".encode(),
    ]
    for body in bodies:
        r = httpx.post(
            f"{tiny_server.base_url}/files", content=body, headers={"content-type": "multipart/form-data; boundary=xyz"}
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "file", r.text
    assert {f.id for f in fc.files.list()} == before
    assert {p.name for p in (tiny_server.home / "files").iterdir()} == before


def test_bad_list_parameters_are_400(tiny_server):
    for params, param in [
        ({"limit": 0}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"order": "up"}, "order"),
        ({"after": "file-nope"}, "after"),
    ]:
        r = httpx.get(f"{tiny_server.base_url}/files", params=params)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_size_limit_is_413_and_stores_nothing(fc, tiny_server):
    before = {f.id for f in fc.files.list()}
    with pytest.raises(openai.APIStatusError) as e:
        fc.files.create(file=("big.jsonl", b"x" * (LIMIT + 1)), purpose="fine-tune")
    assert e.value.status_code == 413 and e.value.response.json()["error"]["param"] == "file"
    # far over: refused from Content-Length before the body is read
    r = httpx.post(
        f"{tiny_server.base_url}/files",
        files={"file": ("big", b"x" * (LIMIT + 200_000))},
        data={"purpose": "fine-tune"},
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert {f.id for f in fc.files.list()} == before
    assert not [p for p in (tiny_server.home / "files").iterdir() if p.name.startswith(".tmp-")]
    # exactly at the limit is fine
    assert fc.files.create(file=("ok.jsonl", b"x" * LIMIT), purpose="fine-tune").bytes == LIMIT


def test_upload_cut_off_half_way_leaves_nothing(fc, tiny_server):
    before = {f.id for f in fc.files.list()}
    files_dir = tiny_server.home / "files"
    boundary = "----cutoff"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="cut.jsonl"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    total = len(head) + 40_000 + len(f"\r\n--{boundary}--\r\n")
    s = socket.create_connection(("127.0.0.1", tiny_server.port))
    s.sendall(
        (
            f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {total}\r\n\r\n"
        ).encode()
        + head
        + b'{"prompt": "a", "completion": "b"}\n' * 500
    )
    deadline = time.time() + 10
    while not [p for p in files_dir.iterdir() if p.name.startswith(".tmp-")]:  # the bytes stream to a temp file
        assert time.time() < deadline, "the upload never reached the files directory"
        time.sleep(0.05)
    s.close()  # cut off half-way
    deadline = time.time() + 10
    while [p for p in files_dir.iterdir() if p.name.startswith(".tmp-")]:
        assert time.time() < deadline, "the cut-off upload left its temp file"
        time.sleep(0.05)
    assert {f.id for f in fc.files.list()} == before
    assert {p.name for p in files_dir.iterdir()} == before


def test_files_survive_a_restart(tmp_path_factory):
    tiny = tiny_chat_llama(tmp_path_factory.getbasetemp())
    home = tmp_path_factory.mktemp("restart-home")
    args = ["--no-default-models", "--model", str(tiny), "--no-worker"]
    srv = ServerProcess(args, home)
    c = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
    f = c.files.create(file=("keep.jsonl", b'{"a": 1}\n'), purpose="fine-tune")
    srv.stop()
    srv = ServerProcess(args, home)
    try:
        c = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        assert c.files.retrieve(f.id) == f and c.files.content(f.id).content == b'{"a": 1}\n'
    finally:
        srv.stop()


# ---- Content-Disposition (RFC 6266) -------------------------------------------------------------


@pytest.mark.parametrize(
    "name, fallback, encoded",
    [
        ("../../../../outside.txt", "outside.txt", "..%2F..%2F..%2F..%2Foutside.txt"),
        ('say "hi".jsonl', "say _hi_.jsonl", "say%20%22hi%22.jsonl"),
        ("données é.jsonl", "donn_es _.jsonl", "donn%C3%A9es%20%C3%A9.jsonl"),
        ("a\r\nSet-Cookie: x=1", "a__Set-Cookie_ x_1", "a%0D%0ASet-Cookie%3A%20x%3D1"),
        ("C:\\Users\\me\\..", "file", "C%3A%5CUsers%5Cme%5C.."),
        ("train.jsonl", "train.jsonl", "train.jsonl"),
    ],
)
def test_content_disposition_has_a_safe_fallback_and_the_real_name_encoded(name, fallback, encoded):
    from urllib.parse import unquote

    from fundament.server.serving_files import content_disposition

    header = content_disposition(name)
    assert header == f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}"
    assert header.isascii() and header.isprintable()
    assert unquote(encoded) == name  # filename* gives the real name back


def upload_named(tiny_server, filename: str) -> str:
    """Upload with this exact filename in the multipart header (clients escape some characters)."""
    boundary = "b0undary"
    quoted = filename.replace("\\", "\\\\").replace('"', '\\"')
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nuser_data\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{quoted}"\r\n\r\n'
        f"hello\r\n--{boundary}--\r\n"
    ).encode()
    r = httpx.post(
        f"{tiny_server.base_url}/files",
        content=body,
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["filename"] == filename  # stored as given
    return r.json()["id"]


def test_file_content_header_is_safe_for_path_quote_and_non_ascii_names(tiny_server):
    cases = [
        (
            "../../../../outside.txt",
            "attachment; filename=\"outside.txt\"; filename*=UTF-8''..%2F..%2F..%2F..%2Foutside.txt",
        ),
        ('a"b".jsonl', "attachment; filename=\"a_b_.jsonl\"; filename*=UTF-8''a%22b%22.jsonl"),
        ("données.jsonl", "attachment; filename=\"donn_es.jsonl\"; filename*=UTF-8''donn%C3%A9es.jsonl"),
    ]
    for name, expected in cases:
        r = httpx.get(f"{tiny_server.base_url}/files/{upload_named(tiny_server, name)}/content")
        assert r.status_code == 200 and r.content == b"hello"
        assert r.headers["content-disposition"] == expected
    assert not (tiny_server.home / "outside.txt").exists() and not (tiny_server.home.parent / "outside.txt").exists()


# ---- a job's own copy of a file -----------------------------------------------------------------


def test_keep_links_the_bytes_so_deleting_the_file_leaves_the_copy(tmp_path):
    files = FileStore(JobStore(tmp_path / "db.sqlite3"), tmp_path / "files")
    fid = files.add_bytes(b'{"prompt": "a", "completion": "b"}\n', "t.jsonl", "fine-tune")["id"]
    dest = files.keep(fid, tmp_path / "job" / "data" / "training_file.jsonl")
    assert dest.read_bytes() == files.read(fid)
    assert (
        dest.stat().st_ino == files.path(fid).stat().st_ino and dest.stat().st_nlink == 2
    )  # a link: no second copy on disk
    assert files.delete(fid) and not files.path(fid).exists()
    assert dest.read_bytes() == b'{"prompt": "a", "completion": "b"}\n' and dest.stat().st_nlink == 1
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]  # no temporary file left
    with pytest.raises(FileNotFoundError):
        files.keep(fid, tmp_path / "job" / "data" / "again.jsonl")
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]


def test_keep_copies_where_a_link_cannot_be_made(tmp_path, monkeypatch):
    import errno
    import os

    files = FileStore(JobStore(tmp_path / "db.sqlite3"), tmp_path / "files")
    fid = files.add_bytes(b"x" * 5000, "t.jsonl", "fine-tune")["id"]

    def no_link(src, dst):  # as across filesystems
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    dest = files.keep(fid, tmp_path / "job" / "t.jsonl")
    assert dest.read_bytes() == b"x" * 5000 and dest.stat().st_ino != files.path(fid).stat().st_ino
    files.delete(fid)
    assert dest.read_bytes() == b"x" * 5000
