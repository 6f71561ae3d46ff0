"""A second process on a FaissStore folder, driven by the durability tests over stdin/stdout.

    python faiss_store_child.py <store path> <flush_interval_s> <tag> <n> <batch> <seed>

puts ``n`` vectors (``keys_for(n, tag, tag)``, ``unit_vectors(n, seed)``) in batches of ``batch``
and then answers commands, one per stdin line, each with one stdout line:

    wait-flushed  block until no put is queued -> "flushed <wal bytes>"
    flush         commit the queue now         -> "flushed <wal bytes>"
    put <tag> <n> <seed> [batch]  more puts   -> "put"
    count <tag> <n>   refresh, count hits      -> "count <hits>"
    close         close the store and exit     -> "closed"

The first line it prints is "ready <wal bytes>" once its puts have returned. The tests kill it
with SIGKILL between commands.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from cache_helpers import DIM, FP, keys_for, unit_vectors

from headfleet.cache import FaissStore


def wal_bytes(path: Path) -> int:
    wal = path.with_suffix(".sqlite-wal")
    return os.path.getsize(wal) if wal.exists() else 0


def main() -> None:
    path, interval, tag, n, batch, seed = (Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3],
                                           int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    store = FaissStore(DIM, FP, path, flush_interval_s=interval)
    keys, vecs = keys_for(n, tag, tag), unit_vectors(n, seed)
    for start in range(0, n, batch):
        part = keys[start:start + batch]
        store.put_many(part, vecs[start:start + batch], [tag] * len(part))
    print("ready", wal_bytes(path), flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "wait-flushed":
            while store.dirty:
                time.sleep(0.01)
            print("flushed", wal_bytes(path), flush=True)
        elif cmd == "flush":
            store.flush()
            print("flushed", wal_bytes(path), flush=True)
        elif cmd == "put":
            t, m, s = args[0], int(args[1]), int(args[2])
            step = int(args[3]) if len(args) > 3 else max(m, 1)
            more_keys, more_vecs = keys_for(m, t, t), unit_vectors(m, s)
            for start in range(0, m, step):
                part = more_keys[start:start + step]
                store.put_many(part, more_vecs[start:start + step], [t] * len(part))
            print("put", flush=True)
        elif cmd == "count":
            got = store.get_many(keys_for(int(args[1]), args[0], args[0]))
            print("count", sum(g is not None for g in got), flush=True)
        elif cmd == "close":
            store.close()
            print("closed", flush=True)
            return


if __name__ == "__main__":
    main()
