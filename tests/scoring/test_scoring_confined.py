"""A confined job opens nothing outside its folder: every path component, symlinks included, is resolved
beneath the folder when the file is opened — by ``openat2(RESOLVE_BENEATH)`` and by the walk used where
the kernel lacks it (every test runs with both). Real files, real symlinks, a real FIFO, real SQLite."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from headfleet.errors import ForbiddenError, NotFoundError, ValidationError
from headfleet.scoring import Source, SourceSpec, confined
from headfleet.scoring.confined import Escape, Root, refusing
from headfleet.scoring.sources import check_row
from scoring_stores import write_csv, write_jsonl, write_parquet, write_sqlite

SECRET = "tenant a's private text"


@pytest.fixture(params=["openat2", "walk"])
def resolver(request, monkeypatch, tmp_path) -> str:
    if request.param == "walk":
        monkeypatch.setattr(confined, "_openat2_works", False)
    else:
        fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if not confined._openat2_probe(fd):
                pytest.skip("this kernel has no openat2 (the walk is tested on its own)")
        finally:
            os.close(fd)
    return request.param


@pytest.fixture
def root(tmp_path, resolver) -> Path:
    """``<scoring root>/a`` (the victim: a JSONL, CSV, Parquet and SQLite store) and ``<scoring root>/b``."""
    top = tmp_path / "scoring"
    (top / "a").mkdir(parents=True)
    (top / "b").mkdir()
    docs = [("a-1", SECRET), ("a-2", SECRET + " again")]
    write_jsonl(top / "a" / "docs.jsonl", docs)
    write_csv(top / "a" / "docs.csv", docs)
    write_parquet(top / "a" / "docs.parquet", docs)
    write_sqlite(top / "a" / "docs.db", docs)
    return top


def link(path: Path, target: str | Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)
    return path


def swap_in_link(path: Path, target: str | Path) -> None:
    """Replace ``path`` by a symlink in one rename, as an attacker racing the job would."""
    tmp = path.with_name(path.name + ".swap")
    tmp.symlink_to(target)
    os.replace(tmp, path)


@pytest.mark.parametrize("name, target, read", [
    ("dir/1.jsonl", "../../a/docs.jsonl", "dir/1.jsonl"),  # a file link up and across
    ("dir/1.jsonl", "/etc/passwd", "dir/1.jsonl"),  # an absolute link
    ("dir/sub", "../../a", "dir/sub/docs.jsonl"),  # a folder link: the last component is a plain file
    ("up", "..", "up/a/docs.jsonl"),  # a link to the parent
    ("dir/deep", "../dir/../..", "dir/deep/a/docs.jsonl"),  # dots inside a link's target
])
def test_a_link_that_leaves_the_folder_is_refused_wherever_it_is(root, name, target, read):
    (root / "b" / "dir").mkdir()
    link(root / "b" / name, target)
    fs = Root(root / "b")
    for call in (fs.file, fs.stat, fs.realpath, fs.open_file):
        with pytest.raises(Escape) as exc:
            call(root / "b" / read)
        assert exc.value.path == read and str(root) not in exc.value.message
    with pytest.raises(Escape):
        fs.file(root / "b" / "dir" / ".." / ".." / "a" / "docs.jsonl")  # plain '..' above the folder


def test_an_absolute_link_is_refused_even_when_it_points_inside(root):
    (root / "b" / "own.jsonl").write_text("{}\n")
    link(root / "b" / "abs.jsonl", root / "b" / "own.jsonl")
    with pytest.raises(Escape):
        Root(root / "b").file(root / "b" / "abs.jsonl")


def test_links_that_stay_inside_are_followed(root):
    b = root / "b"
    (b / "store").mkdir()
    write_jsonl(b / "store" / "x.jsonl", [("x", "hello")])
    link(b / "alias.jsonl", "store/x.jsonl")
    link(b / "dir" / "up-and-over.jsonl", "../store/x.jsonl")
    link(b / "ldir", "store")
    fs = Root(b)
    for rel in ("alias.jsonl", "dir/up-and-over.jsonl", "ldir/x.jsonl", "ldir/../alias.jsonl"):
        with fs.file(b / rel) as f:
            assert b'"hello"' in f.read()
    assert str(fs.realpath(b / "ldir" / "x.jsonl")) == "store/x.jsonl"
    assert str(fs.realpath(b / "ldir" / "new" / "o.parquet")) == "store/new/o.parquet"  # missing tail kept


def test_a_symlinked_tenant_folder_is_refused(root):
    link(root / "c", "a")  # c's folder is a's
    for call in (Root(root / "c").stat, Root(root / "c").realpath):
        with pytest.raises(Escape, match="folder is a symbolic link") as exc:
            call(root / "c" / "docs.jsonl")
        assert exc.value.path is None and str(root) not in exc.value.message


def test_a_fifo_is_refused_without_blocking(root):
    os.mkfifo(root / "b" / "pipe.jsonl")
    with pytest.raises(ValidationError, match="not a regular file"):
        Root(root / "b").file(root / "b" / "pipe.jsonl")
    with pytest.raises(ValidationError, match="not a regular file or a folder"):
        Source(SourceSpec(str(root / "b" / "pipe.jsonl")), Root(root / "b"))


def test_paths_the_filesystem_refuses_are_the_callers_errors(root):
    b = root / "b"
    fs = Root(b)
    (b / "f.jsonl").write_text("{}\n")
    link(b / "loop1", "loop2")
    link(b / "loop2", "loop1")
    cases = [
        (b / ("x" * 300 + ".jsonl"), ValidationError, "too long"),  # one name over 255 bytes
        (b.joinpath(*["d" * 200] * 25), ValidationError, "too long"),  # over 4096 in all
        (b / "loop1", ValidationError, "too many symbolic links"),
        (b / "f.jsonl" / "x.jsonl", ValidationError, "one of its folders is a file"),
        (b / "missing.jsonl", NotFoundError, "does not exist"),
        (b / "\ud83d.jsonl", ValidationError, "not valid Unicode"),
        (b / "nul\x00.jsonl", ValidationError, "NUL"),
    ]
    for path, cls, says in cases:
        with pytest.raises(cls, match=says):
            with refusing("source 'x'"):
                fs.file(path)


def test_a_write_replaces_a_link_at_its_name_and_never_writes_through_one(root):
    a, b = root / "a", root / "b"
    (a / "victim.json").write_text("a's")
    link(b / "out.json", "../a/victim.json")
    fs = Root(b)
    fs.write_bytes(b / "out.json", b"b's")
    assert (a / "victim.json").read_text() == "a's"
    assert not (b / "out.json").is_symlink() and (b / "out.json").read_text() == "b's"
    link(b / "o", "../a")  # a folder on the way out
    with pytest.raises(Escape):
        fs.write_bytes(b / "o" / "new" / "x.json", b"b's")
    with pytest.raises(Escape):
        fs.makedirs(b / "o" / "made")
    assert sorted(p.name for p in a.iterdir()) == ["docs.csv", "docs.db", "docs.jsonl", "docs.parquet", "victim.json"]
    fs.write_bytes(b / "made" / "deep" / "x.json", b"{}")  # folders made one by one, beneath the root
    assert (b / "made" / "deep" / "x.json").read_bytes() == b"{}"


def test_removing_a_partial_output_never_follows_a_link(root):
    b = root / "b"
    (b / "o.parquet.partial" / "parts").mkdir(parents=True)
    link(b / "o.parquet.partial" / "parts" / "evil", "../../../a")
    link(b / "l.partial", "../a")
    fs = Root(b)
    fs.remove_tree(b / "o.parquet.partial")
    fs.remove_tree(b / "l.partial")  # the link goes, not what it points at
    assert not (b / "o.parquet.partial").exists() and not (b / "l.partial").is_symlink()
    assert (root / "a" / "docs.jsonl").exists()


def test_sqlite_reads_only_the_file_that_was_verified(root, monkeypatch):
    b = root / "b"
    write_sqlite(b / "own.db", [("b-1", "b's text")])
    write_sqlite(b / "other.db", [("o-1", "another file inside")])
    fs = Root(b)
    conn = fs.connect_sqlite(b / "own.db")
    assert conn.execute("SELECT id FROM tickets").fetchall() == [("b-1",)]
    conn.close()
    link(b / "theirs.db", "../a/docs.db")
    with pytest.raises(Escape):
        fs.connect_sqlite(b / "theirs.db")
    # a component swapped between the check and SQLite's own open: SQLite ends up on another file
    monkeypatch.setattr(Root, "real_path_of", lambda self, fd, path: str(b / "other.db"))
    with pytest.raises(Escape, match="changed while it was being opened"):
        fs.connect_sqlite(b / "own.db")


# -- stores --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["../../a/docs.jsonl", "/etc/passwd", "../../a"])
def test_a_folder_store_with_a_link_out_is_refused_before_anything_is_read(root, target):
    b = root / "b"
    (b / "dir").mkdir()
    write_jsonl(b / "dir" / "0.jsonl", [("b-1", "b's text")])
    link(b / "dir" / "1.jsonl", target)
    with pytest.raises(Escape) as exc:
        Source(SourceSpec(str(b / "dir")), Root(b))
    assert exc.value.path == "dir/1.jsonl" and str(root) not in exc.value.message


def test_a_folder_store_follows_links_inside_and_refuses_a_loop(root):
    b = root / "b"
    (b / "dir").mkdir()
    (b / "more").mkdir()
    write_jsonl(b / "dir" / "0.jsonl", [("b-1", "one")])
    write_jsonl(b / "more" / "1.jsonl", [("b-2", "two")])
    link(b / "dir" / "linked", "../more")
    source = Source(SourceSpec(str(b / "dir")), Root(b))
    assert [str(p.relative_to(b)) for p in source.files] == ["dir/0.jsonl", "dir/linked/1.jsonl"]
    assert [r[1] for i in range(2) for r in source.rows(i)] == ["b-1", "b-2"]
    link(b / "dir" / "again", ".")
    with pytest.raises(ValidationError, match="reached twice"):
        Source(SourceSpec(str(b / "dir")), Root(b))


STORES = {"jsonl": write_jsonl, "csv": write_csv, "parquet": write_parquet, "db": write_sqlite}


@pytest.mark.parametrize("ext", list(STORES))
def test_a_link_swapped_in_after_the_store_was_opened_is_refused_when_it_is_read(root, ext):
    b = root / "b"
    store = STORES[ext](b / f"store.{ext}", [("b-1", "b's own text")])
    source = Source(SourceSpec(str(store)), Root(b))
    assert [r[1] for r in source.rows(0)] == ["b-1"]
    swap_in_link(store, f"../a/docs.{ext}")  # the same format: a reader that opened by path would read a's rows
    with pytest.raises(Escape) as exc:
        list(source.rows(0))
    assert exc.value.path == f"store.{ext}"
    with pytest.raises(Escape):
        source.estimate_rows()
    with pytest.raises(Escape):
        source.identity()


def test_unconfined_sources_still_read_any_path(tmp_path):
    """The command line scores the user's own files: Root(None) follows links anywhere."""
    write_jsonl(tmp_path / "real.jsonl", [("x", "hello")])
    link(tmp_path / "dir" / "l.jsonl", "../real.jsonl")
    source = Source(SourceSpec(str(tmp_path / "dir")))
    assert [r[1] for r in source.rows(0)] == ["x"]


# -- what a row must be ----------------------------------------------------------------------------------
def test_every_reader_handles_a_bom_and_crlf_line_ends(tmp_path):
    bom = b"\xef\xbb\xbf"
    lines = [json.dumps({"id": f"j{i}", "text": f"document {i}"}).encode() for i in range(3)]
    (tmp_path / "docs.jsonl").write_bytes(bom + b"\r\n".join(lines) + b"\r\n")
    rows = list(Source(SourceSpec(str(tmp_path / "docs.jsonl"))).rows(0))
    assert [(r[1], r[2], r[3]) for r in rows] == [(f"j{i}", f"document {i}", None) for i in range(3)]

    (tmp_path / "docs.csv").write_bytes(bom + b'id,text\r\nc0,first\r\nc1,"two\r\nlines"\r\nc2,third\r\n')
    source = Source(SourceSpec(str(tmp_path / "docs.csv")))  # the header's first name is "id", BOM or not
    rows = list(source.rows(0))
    assert [(r[1], r[2], r[3]) for r in rows] == [("c0", "first", None), ("c1", "two\r\nlines", None),
                                                  ("c2", "third", None)]
    assert source.estimate_rows()[0] >= 3


def test_rows_with_no_visible_content_or_lone_surrogates_are_rejects_with_reasons(tmp_path):
    lines = [
        '{"id": "ok", "text": "Claim your prize"}',
        '{"id": "zw", "text": "\\u200b\\u200d\\ufeff"}',  # zero-width space, joiner, BOM
        '{"id": "blank", "text": " \\t "}',
        '{"id": "hi", "text": "\\ud83d"}',  # a lone high surrogate, as JSON spells it
        '{"id": "lo", "text": "caf\\ude00"}',
        '{"id": "\\udc00x", "text": "a fine text"}',
        '{"id": "emoji", "text": "\\ud83d\\ude00 a pair is fine"}',
        '{"id": "meta", "text": "fine", "note": "\\ud800"}',  # a field nobody reads
        '{"id": "broken", "text": "\\ud83d',
    ]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows = list(Source(SourceSpec(str(tmp_path / "docs.jsonl"))).rows(0))
    got = [(r[1] if r[3] is None else r[3].get("id"), r[3] and r[3]["reason"]) for r in rows]
    assert got == [("ok", None), ("zw", "no visible content"), ("blank", "empty text"),
                   ("hi", "text is not valid Unicode (lone surrogate)"),
                   ("lo", "text is not valid Unicode (lone surrogate)"),
                   (None, "id is not valid Unicode (lone surrogate)"),
                   ("emoji", None), ("meta", None), (None, "invalid JSON")]
    assert rows[1][3]["detail"] == "only invisible characters (U+200B, U+200D, U+FEFF)"
    for r in rows:  # every reject can be written as UTF-8 JSON (the rejects file), surrogates escaped
        json.dumps(r[3], ensure_ascii=False).encode("utf-8")
    assert rows[5][3]["raw"] == "\\udc00x"

    for text in ("\u2800", "\u3164", "\u00ad\u034f", "\u0301"):  # Braille blank, Hangul filler, soft hyphen...
        assert check_row(0, "x", text, "string")[3]["reason"] == "no visible content"
    assert check_row(0, "x", "e\u0301", "string")[3] is None


def test_undecodable_parquet_strings_are_one_rows_reject(tmp_path):
    def unchecked_strings(values: list[bytes]) -> pa.Array:  # as other writers leave them: not validated
        offsets = [0]
        for v in values:
            offsets.append(offsets[-1] + len(v))
        return pa.Array.from_buffers(pa.string(), len(values), [None, pa.py_buffer(pa.array(offsets, pa.int32())
                                                                                    .buffers()[1]),
                                                                pa.py_buffer(b"".join(values))])

    table = pa.table({"id": unchecked_strings([b"p1", b"p2"]), "text": unchecked_strings([b"fine", b"caf\xe9"])})
    pq.write_table(table, tmp_path / "bad.parquet")
    rows = list(Source(SourceSpec(str(tmp_path / "bad.parquet"))).rows(0))
    assert [(r[1], r[3] and r[3]["reason"]) for r in rows] == [("p1", None), ("p2", "undecodable bytes")]


def test_stat_and_lookup_resolve_beneath_too(root):
    (root / "b" / "d").mkdir()
    fs = Root(root / "b")
    assert stat.S_ISDIR(fs.stat(root / "b" / "d").st_mode)
    assert fs.lookup(root / "b" / "nothing") is None
    link(root / "b" / "dangling.jsonl", "nothing")
    assert fs.lookup(root / "b" / "dangling.jsonl") is None
    with pytest.raises(ForbiddenError):
        fs.lookup(root / "a" / "docs.jsonl")  # lexically outside as well
