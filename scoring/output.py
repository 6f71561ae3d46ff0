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

Output columns: ``id`` (int64 when the source's id column is an integer column, else string),
``truncated`` (the text was longer than the backbone's max length), and one column per
classifier as asked: ``{label, score, version}`` (``score``: the label's probability) or, for a
multi-label classifier, ``{labels, scores, version}``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from headfleet.heads.atomic import fsync_dir, json_default, write_json_atomic

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


def _write_atomic(path: Path, write) -> None:
    """``write(tmp_path)``, fsync, rename over ``path``: a reader sees no file or a whole one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _jsonl_bytes(rows: Iterable[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, default=json_default) + "\n" for r in rows).encode("utf-8")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    _write_atomic(path, lambda tmp: Path(tmp).write_bytes(data))


class Workdir:
    """``<out>.partial/``: parts, rejects, checkpoint of one job."""

    def __init__(self, out: Path, fmt: str):
        self.out = out
        self.fmt = fmt
        self.path = out.with_name(out.name + ".partial")
        self.parts = self.path / "parts"
        self.rejects = self.path / "rejects"
        self.checkpoint_path = self.path / "checkpoint.json"

    def exists(self) -> bool:
        return self.checkpoint_path.exists()

    def create(self) -> None:
        self.parts.mkdir(parents=True, exist_ok=True)
        self.rejects.mkdir(parents=True, exist_ok=True)

    def read_checkpoint(self) -> dict:
        with open(self.checkpoint_path, encoding="utf-8") as f:
            return json.load(f)

    def write_checkpoint(self, state: dict) -> None:
        write_json_atomic(self.checkpoint_path, state)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

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
                _write_atomic(self.parts / f"{name}.parquet", lambda tmp: pq.write_table(tbl, tmp))
            else:
                write_bytes_atomic(self.parts / f"{name}.jsonl", _jsonl_bytes(tbl.to_pylist()))
        if rejects:
            write_bytes_atomic(self.rejects / f"{name}.jsonl", _jsonl_bytes(rejects))

    def drop_uncommitted(self, cursor: tuple[int, int]) -> int:
        """Delete parts at or past ``cursor`` (a run died after writing them, before committing)."""
        dropped = 0
        for folder in (self.parts, self.rejects):
            for p in folder.iterdir():
                key = self._key(p.name)
                if p.name.startswith(".") or key is None or key >= cursor:
                    p.unlink()
                    dropped += 1
        return dropped

    def _committed(self, folder: Path, cursor: tuple[int, int]) -> list[Path]:
        keyed = [(self._key(p.name), p) for p in folder.iterdir() if not p.name.startswith(".")]
        return [p for k, p in sorted(kp for kp in keyed if kp[0] is not None and kp[0] < cursor)]

    def assemble(self, sch: pa.Schema, cursor: tuple[int, int], rejects_out: Path) -> int:
        """Concatenate the committed parts into ``out`` and ``rejects_out``; returns the rows written."""
        parts = self._committed(self.parts, cursor)
        rows = 0
        if self.fmt == "parquet":
            def write(tmp: str) -> None:
                nonlocal rows
                with pq.ParquetWriter(tmp, sch) as writer:
                    pending: list[pa.Table] = []
                    held = 0
                    for p in parts:
                        t = pq.read_table(p, schema=sch)
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
            def write(tmp: str) -> None:
                nonlocal rows
                with open(tmp, "wb") as dst:
                    for p in parts:
                        with open(p, "rb") as src:
                            for line in src:
                                dst.write(line)
                                rows += 1
        self.out.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(rejects_out, lambda tmp: _concat(self._committed(self.rejects, cursor), tmp))
        _write_atomic(self.out, write)
        fsync_dir(self.out.parent)
        return rows


def _concat(paths: list[Path], tmp: str) -> None:
    with open(tmp, "wb") as dst:
        for p in paths:
            with open(p, "rb") as src:
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
