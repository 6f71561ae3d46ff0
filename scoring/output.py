"""Job output on disk: numbered parts plus a checkpoint while the job runs, one file at the end.

While a job runs, ``<out>.partial/`` holds

    parts/<file>-<chunk>.parquet|.jsonl    one scored chunk, written to a temp file, fsynced, renamed
    rejects/<file>-<chunk>.jsonl           that chunk's bad rows, the same way
    checkpoint.json                        the job spec, the cursor (next chunk) and the counts so far

and a chunk is committed when the checkpoint that moves the cursor past it is renamed into place.
A part whose chunk is at or past the cursor is from a run that died before committing it: it is
deleted at resume and written again, so the final output holds every document exactly once.
At the end the committed parts are concatenated (in source order) into ``<out>`` through a temp
file and a rename; then the rejects file and the report, then the partial folder is removed.

Every file here is opened through the job's :class:`~headfleet.scoring.confined.Root`: in the
service, the output, its folders, the partial folder and everything in it must resolve inside the
tenant's folder when they are opened (a folder on the way that is a symlink out is refused), and
a symlink at a file's name is replaced by the rename, never written through.

Output columns: ``id`` (int64 when the source's id column is an integer column, else string),
``truncated`` (the text was longer than the backbone's max length), and one column per
classifier as asked: ``{label, score, version}`` (``score``: the label's probability) or, for a
multi-label classifier, ``{labels, scores, version}``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from headfleet.atomic import json_default
from headfleet.scoring.confined import Root

FORMATS = ("parquet", "jsonl")
RESERVED = ("id", "truncated")
ROW_GROUP_ROWS = 65536


def format_of(out: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(fmt)
        return fmt
    suffix = out.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    return ""


def schema(id_type: str, classifiers: dict[str, bool]) -> pa.Schema:
    """``classifiers``: output column -> multi-label?"""
    fields = [pa.field("id", pa.int64() if id_type == "int64" else pa.string(), nullable=False),
              pa.field("truncated", pa.bool_())]
    for ref, multi in classifiers.items():
        if multi:
            t = pa.struct([("labels", pa.list_(pa.string())), ("scores", pa.list_(pa.float64())),
                           ("version", pa.int64())])
        else:
            t = pa.struct([("label", pa.string()), ("score", pa.float64()), ("version", pa.int64())])
        fields.append(pa.field(ref, t))
    return pa.schema(fields)


def table(sch: pa.Schema, ids: list, truncated: list[bool], results: dict[str, dict[str, list]]) -> pa.Table:
    """``results``: output column -> its struct's fields as lists (``label``, ``score``, ``version``)."""
    arrays = [pa.array(ids, type=sch.field("id").type), pa.array(truncated, type=pa.bool_())]
    for f in sch:
        if f.name in RESERVED:
            continue
        cols = results[f.name]
        children = [pa.array(cols[sub.name], type=sub.type) for sub in f.type]
        arrays.append(pa.StructArray.from_arrays(children, fields=list(f.type)))
    return pa.Table.from_arrays(arrays, schema=sch)


def _jsonl_bytes(rows: Iterable[dict]) -> bytes:
    # backslashreplace: a lone surrogate that got this far is written escaped, not a failed chunk
    return "".join(json.dumps(r, ensure_ascii=False, default=json_default) + "\n"
                   for r in rows).encode("utf-8", "backslashreplace")


def json_bytes(data: Any) -> bytes:
    """A report or checkpoint as ``headfleet.atomic.write_json_atomic`` writes one."""
    return (json.dumps(data, indent=2, ensure_ascii=False, default=json_default) + "\n").encode("utf-8",
                                                                                               "backslashreplace")


class Workdir:
    """``<out>.partial/``: parts, rejects, checkpoint of one job; every file opened beneath ``fs``."""

    def __init__(self, out: Path, fmt: str, fs: Root | None = None):
        self.out = out
        self.fmt = fmt
        self.fs = fs if fs is not None else Root(None)
        self.path = out.with_name(out.name + ".partial")
        self.parts = self.path / "parts"
        self.rejects = self.path / "rejects"
        self.checkpoint_path = self.path / "checkpoint.json"

    def exists(self) -> bool:
        return self.fs.lookup(self.checkpoint_path) is not None

    def create(self) -> None:
        self.fs.makedirs(self.parts)
        self.fs.makedirs(self.rejects)

    def read_checkpoint(self) -> dict:
        return json.loads(self.fs.read_bytes(self.checkpoint_path).decode("utf-8"))

    def write_checkpoint(self, state: dict) -> None:
        self.fs.write_bytes(self.checkpoint_path, json_bytes(state))

    def remove(self) -> None:
        self.fs.remove_tree(self.path)

    @staticmethod
    def _name(key: tuple[int, int]) -> str:
        return f"{key[0]:06d}-{key[1]:09d}"

    @staticmethod
    def _key(name: str) -> tuple[int, int] | None:
        stem = name.split(".", 1)[0]
        a, _, b = stem.partition("-")
        return (int(a), int(b)) if a.isdigit() and b.isdigit() else None

    def write_part(self, key: tuple[int, int], tbl: pa.Table | None, rejects: list[dict]) -> None:
        """One chunk's results and rejects, each atomically (the checkpoint commits them)."""
        name = self._name(key)
        if tbl is not None and tbl.num_rows:
            if self.fmt == "parquet":
                self.fs.write_atomic(self.parts / f"{name}.parquet", lambda f: pq.write_table(tbl, f))
            else:
                self.fs.write_bytes(self.parts / f"{name}.jsonl", _jsonl_bytes(tbl.to_pylist()))
        if rejects:
            self.fs.write_bytes(self.rejects / f"{name}.jsonl", _jsonl_bytes(rejects))

    def drop_uncommitted(self, cursor: tuple[int, int]) -> int:
        """Delete parts at or past ``cursor`` (a run died after writing them, before committing)."""
        dropped = 0
        for folder in (self.parts, self.rejects):
            names = [n for n in self.fs.listdir(folder)
                     if n.startswith(".") or self._key(n) is None or self._key(n) >= cursor]
            self.fs.unlink_in(folder, names)
            dropped += len(names)
        return dropped

    def _committed(self, folder: Path, cursor: tuple[int, int]) -> list[Path]:
        keyed = [(self._key(n), folder / n) for n in self.fs.listdir(folder) if not n.startswith(".")]
        return [p for k, p in sorted(kp for kp in keyed if kp[0] is not None and kp[0] < cursor)]

    def assemble(self, sch: pa.Schema, cursor: tuple[int, int], rejects_out: Path) -> int:
        """Concatenate the committed parts into ``out`` and ``rejects_out``; returns the rows written."""
        parts = self._committed(self.parts, cursor)
        fs = self.fs
        rows = 0
        if self.fmt == "parquet":
            def write(dst: BinaryIO) -> None:
                nonlocal rows
                with pq.ParquetWriter(dst, sch) as writer:
                    pending: list[pa.Table] = []
                    held = 0
                    for p in parts:
                        with fs.file(p) as src:
                            t = pq.read_table(src, schema=sch)
                        pending.append(t)
                        held += t.num_rows
                        if held >= ROW_GROUP_ROWS:
                            writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP_ROWS)
                            rows += held
                            pending, held = [], 0
                    if pending:
                        writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP_ROWS)
                        rows += held
        else:
            def write(dst: BinaryIO) -> None:
                nonlocal rows
                for p in parts:
                    with fs.file(p) as src:
                        for line in src:
                            dst.write(line)
                            rows += 1
        rejects = self._committed(self.rejects, cursor)
        fs.write_atomic(rejects_out, lambda dst: _concat(fs, rejects, dst))
        fs.write_atomic(self.out, write)  # creates the output's folder; fsyncs the file and the folder
        return rows


def _concat(fs: Root, paths: list[Path], dst: BinaryIO) -> None:
    for p in paths:
        with fs.file(p) as src:
            shutil.copyfileobj(src, dst)


def read_output(path: Path) -> Iterator[dict[str, Any]]:
    """The rows of a finished output file (Parquet or JSONL), for tests and tools."""
    if format_of(path, None) == "parquet":
        for batch in pq.ParquetFile(path).iter_batches():
            yield from batch.to_pylist()
    else:
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)
