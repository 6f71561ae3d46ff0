"""The group files of ``service.peers`` on their own: telling a live member from a dead one, and
keeping figures a failed write could not publish."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading

import pytest

from headfleet.service.peers import Peers, _held


def test_a_dead_member_reads_as_dead_however_many_probe_it_at_once(tmp_path):
    lock = tmp_path / "m.lock"
    lock.touch()
    seen = []

    def probe():
        seen.extend(_held(lock) for _ in range(2000))

    threads = [threading.Thread(target=probe) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 8000 and not any(seen)  # exclusive probes saw each other as live, 1 in 5

    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1]); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)", str(lock)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert _held(lock)
    finally:
        holder.kill()
        holder.wait()
    assert not _held(lock)


def test_figures_a_failed_write_left_behind_are_written_at_the_next_flush(tmp_path):
    pending = [{"acme": {"n": 1}, "bob": {"n": 2}}]

    def figures(changed_only: bool) -> dict:
        return pending.pop() if pending else {}

    peers = Peers(tmp_path, "g1", heartbeat=lambda: {}, figures=figures, interval_s=3600).start()
    try:
        folder = peers.root / peers.member
        assert json.loads((folder / "acme.json").read_text()) == {"n": 1}
        pending.append({"acme": {"n": 5}})
        shutil.rmtree(folder)  # the write fails (a full disk, a folder removed under it)
        with pytest.raises(OSError):
            peers.flush()
        folder.mkdir()
        pending.append({"bob": {"n": 7}})
        peers.flush()  # the figures that failed, with the newer ones
        assert json.loads((folder / "acme.json").read_text()) == {"n": 5}
        assert json.loads((folder / "bob.json").read_text()) == {"n": 7}
    finally:
        peers.close()
