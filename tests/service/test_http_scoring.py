"""Scoring jobs over HTTP: ``POST /jobs`` on a store in the tenant's scoring folder, ``GET /jobs/{id}``
for state, progress and the report, ``DELETE /jobs/{id}`` to cancel. Paths outside the tenant's
folder are refused; another tenant's job is a 404 like a made-up one; training jobs still work."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from http_server import running

EXAMPLES = Path(__file__).resolve().parents[2] / "engine" / "example_data"
ACME = {"Authorization": "Bearer acme-key"}
GLOBEX = {"Authorization": "Bearer globex-key"}
INITECH = {"Authorization": "Bearer initech-key"}  # its scoring folder is a symlink to globex's
SECRET = "globex's data"


def wait_for(client: httpx.Client, job_id: str, headers: dict, states=("succeeded", "failed", "cancelled"),
              timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/jobs/{job_id}", headers=headers).json()["job"]
        if job["state"] in states:
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job['state']} after {timeout} s"
        time.sleep(0.2)


def sms(n: int, offset: int = 0) -> list[str]:
    with open(EXAMPLES / "spam.csv", newline="", encoding="utf-8") as f:
        base = [r["text"] for r in csv.DictReader(f)]
    return [f"{base[i % len(base)]} (ticket {i})" for i in range(offset, offset + n)]


@pytest.fixture(scope="module")
def server(minilm, tmp_path_factory):
    """Two tenants, a scoring root, and acme's spam classifier trained through ``POST /classifiers``."""
    root = tmp_path_factory.mktemp("scoring-root")
    (root / "acme").mkdir()
    (root / "globex").mkdir()
    (root / "initech").symlink_to("globex")
    with running(minilm, tmp_path_factory.mktemp("scoring-data"),
                 api_keys="acme:acme-key,globex:globex-key,initech:initech-key",
                 scoring_root=root) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        with open(EXAMPLES / "spam.csv", newline="", encoding="utf-8") as f:
            examples = [{"text": r["text"], "label": r["label"]} for r in csv.DictReader(f)]
        r = client.post("/classifiers", json={"name": "spam", "examples": examples}, headers=ACME)
        assert r.status_code == 202
        assert wait_for(client, r.json()["job"]["id"], ACME)["state"] == "succeeded"
        yield srv, client, root


def test_a_scoring_job_scores_the_store_and_reports(server):
    _, client, root = server
    texts = sms(70)
    with open(root / "acme" / "tickets.jsonl", "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": f"t{i}", "text": t}) + "\n")
        f.write(json.dumps({"id": "empty", "text": ""}) + "\n")
        f.write(json.dumps({"text": "no id"}) + "\n")
    r = client.post("/jobs", json={"source": "tickets.jsonl", "classifiers": ["spam"], "output": "out/tickets.parquet"},
                    headers=ACME)
    assert r.status_code == 202, r.text
    job = r.json()["job"]
    assert r.headers["location"] == f"/jobs/{job['id']}" and job["type"] == "score"
    assert job["classifiers"] == {"spam": "spam@1"} and job["state"] in ("queued", "running")
    assert "spec" not in job and str(root) not in json.dumps(job)  # no server paths in answers

    done = wait_for(client, job["id"], ACME)
    assert done["state"] == "succeeded", done["error"]
    assert done["progress"] == {"documents": 72, "total": 72, "total_exact": True, "fraction": 1.0}
    report = done["report"]
    assert report["scored"] == 70 and report["rejected"] == 2
    assert report["rejects_by_reason"] == {"empty text": 1, "missing id": 1}
    assert report["embeddings_computed"] == 70 and sum(report["labels"]["spam"].values()) == 70
    assert done["output"] == "out/tickets.parquet" and done["rejects"] == "out/tickets.rejects.jsonl"
    table = pq.read_table(root / "acme" / "out" / "tickets.parquet")
    assert table.column("id").to_pylist() == [f"t{i}" for i in range(70)]
    assert len((root / "acme" / "out" / "tickets.rejects.jsonl").read_text().splitlines()) == 2

    # the same store again with the output kept: a new job says so, overwrite replaces it from the cache
    r = client.post("/jobs", json={"source": "tickets.jsonl", "classifiers": ["spam"], "output": "out/tickets.parquet"},
                    headers=ACME)
    assert r.status_code == 409 and r.json()["error_type"] == "conflict"
    r = client.post("/jobs", json={"source": "tickets.jsonl", "classifiers": ["spam"], "output": "out/tickets.parquet",
                                   "overwrite": True}, headers=ACME)
    again = wait_for(client, r.json()["job"]["id"], ACME)
    assert again["report"]["embeddings_computed"] == 0 and again["report"]["cache"]["hit_rate"] == 1.0

    listed = [j["id"] for j in client.get("/jobs", headers=ACME).json()["jobs"]]
    assert job["id"] in listed and any(i.startswith("job_") for i in listed)  # training jobs are listed too
    r = client.delete(f"/jobs/{job['id']}", headers=ACME)
    assert r.status_code == 409 and "already succeeded" in r.json()["error"]


def test_another_tenants_job_reads_like_a_missing_one(server):
    _, client, root = server
    (root / "acme" / "few.jsonl").write_text(json.dumps({"id": 1, "text": "Claim your prize"}) + "\n")
    job = client.post("/jobs", json={"source": "few.jsonl", "classifiers": ["spam"]}, headers=ACME).json()["job"]
    for method in ("get", "delete"):
        theirs = getattr(client, method)(f"/jobs/{job['id']}", headers=GLOBEX)
        made_up = getattr(client, method)("/jobs/score_0000000000000000", headers=GLOBEX)
        assert theirs.status_code == made_up.status_code == 404
        assert theirs.json()["error"].replace(job["id"], "X") == made_up.json()["error"].replace(
            "score_0000000000000000", "X")
    assert job["id"] not in [j["id"] for j in client.get("/jobs", headers=GLOBEX).json()["jobs"]]
    wait_for(client, job["id"], ACME)


@pytest.mark.parametrize("source", ["../globex/secret.jsonl", "/etc/passwd", "link/passwd", "..", "outside-link"])
def test_paths_outside_the_tenants_folder_are_refused(server, source):
    _, client, root = server
    (root / "globex" / "secret.jsonl").write_text(json.dumps({"id": 1, "text": "globex's data"}) + "\n")
    for name, target in (("link", Path("/etc")), ("outside-link", root / "globex" / "secret.jsonl")):
        if not (root / "acme" / name).is_symlink():
            (root / "acme" / name).symlink_to(target)
    r = client.post("/jobs", json={"source": source, "classifiers": ["spam"]}, headers=ACME)
    assert r.status_code == 403
    assert r.json() == {"error": f"source {source!r} is outside your scoring folder; give a path relative to it",
                        "error_type": "forbidden"}
    r = client.post("/jobs", json={"source": "few.jsonl", "classifiers": ["spam"], "output": "../globex/o.parquet"},
                    headers=ACME)
    assert r.status_code == 403 and r.json()["error_type"] == "forbidden"


def secret_store(root: Path) -> Path:
    """globex's private store, the target of every link below."""
    path = root / "globex" / "secret.jsonl"
    path.write_text(json.dumps({"id": "g1", "text": SECRET}) + "\n")
    return path


def nothing_of_the_secret_in(folder: Path) -> bool:
    return all(SECRET.encode() not in p.read_bytes() for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


@pytest.mark.parametrize("n, name, target", [(1, "1.jsonl", "../../globex/secret.jsonl"), (2, "1.jsonl", "/etc/passwd"),
                                             (3, "sub", "../../globex")])
def test_a_folder_source_with_a_link_out_is_refused(server, n, name, target):
    """acme's folder source holds a link to globex's store (or /etc/passwd, or globex's folder): 403, no job,
    and nothing of the target reaches acme's folder (no output, no rejects file)."""
    _, client, root = server
    secret_store(root)
    store = root / "acme" / f"linked-{n}"
    store.mkdir()
    (store / "0.jsonl").write_text(json.dumps({"id": "a1", "text": "acme's own ticket"}) + "\n")
    (store / name).symlink_to(target)
    before = len(client.get("/jobs", headers=ACME).json()["jobs"])
    r = client.post("/jobs", json={"source": store.name, "classifiers": ["spam"], "output": f"{store.name}.jsonl"},
                    headers=ACME)
    assert r.status_code == 403, r.text
    body = r.json()
    assert body["error_type"] == "forbidden"
    assert f"'{store.name}/{name}' leads outside your scoring folder" in body["error"]
    assert str(root) not in r.text and "/etc" not in r.text
    assert len(client.get("/jobs", headers=ACME).json()["jobs"]) == before
    assert not (root / "acme" / f"{store.name}.jsonl").exists()
    assert not (root / "acme" / f"{store.name}.rejects.jsonl").exists()
    assert nothing_of_the_secret_in(root / "acme")


def test_outputs_that_lead_outside_are_refused(server):
    _, client, root = server
    (root / "acme" / "mine.jsonl").write_text(json.dumps({"id": 1, "text": "Claim your prize"}) + "\n")
    (root / "acme" / "out-link.parquet").symlink_to("../globex/o.parquet")  # the output itself
    (root / "acme" / "out-dir").symlink_to("../globex")  # a folder on the way
    (root / "acme" / "deep").mkdir()
    (root / "acme" / "deep" / "up").symlink_to("../..")  # a link up, then down into globex
    for output in ("out-link.parquet", "out-dir/o.parquet", "out-dir/new/o.parquet", "deep/up/globex/o.parquet"):
        r = client.post("/jobs", json={"source": "mine.jsonl", "classifiers": ["spam"], "output": output},
                        headers=ACME)
        assert r.status_code == 403, (output, r.text)
        assert r.json() == {"error": f"output {output!r} is outside your scoring folder; give a path relative to it",
                            "error_type": "forbidden"}
    assert not any(p.name.startswith("o.") for p in (root / "globex").iterdir())


def test_a_symlinked_tenant_folder_is_refused(server):
    _, client, root = server
    secret_store(root)
    r = client.post("/jobs", json={"source": "secret.jsonl", "classifiers": ["spam"]}, headers=INITECH)
    assert r.status_code == 403, r.text
    assert "your scoring folder is a symbolic link" in r.json()["error"] and str(root) not in r.text


@pytest.mark.parametrize("field", ["source", "output"])
def test_paths_the_filesystem_refuses_are_422_not_500(server, field):
    _, client, root = server
    (root / "acme" / "ok.jsonl").write_text(json.dumps({"id": 1, "text": "Claim your prize"}) + "\n")
    if not (root / "acme" / "loop-a").is_symlink():
        (root / "acme" / "loop-a").symlink_to("loop-b")
        (root / "acme" / "loop-b").symlink_to("loop-a")
    cases = {"x" * 300 + ".jsonl": "too long",  # ENAMETOOLONG: one name over 255 bytes
             "/".join(["d" * 200] * 25) + "/x.jsonl": "too long",  # over PATH_MAX in all
             "loop-a/x.jsonl": "too many symbolic links",  # ELOOP
             "ok.jsonl/x.jsonl": "one of its folders is a file"}  # ENOTDIR
    if field == "output":  # fits, but <name>.partial and <stem>.rejects.jsonl beside it do not
        cases["y" * 244 + ".jsonl"] = "too long"
    for path, says in cases.items():
        body = {"source": "ok.jsonl", "classifiers": ["spam"], "output": "fine.jsonl", field: path}
        r = client.post("/jobs", json=body, headers=ACME)
        assert r.status_code == 422, (path[:40], r.text)
        assert r.json()["error_type"] == "validation_error" and says in r.json()["error"], r.text
        assert str(root) not in r.text


def test_a_link_swapped_in_after_submit_fails_the_job_and_reads_none_of_it(server):
    """The store was fine when the job was submitted; one of its files becomes a link to globex's store
    before the job opens it: the job fails (forbidden), naming the file; nothing of globex's is read."""
    _, client, root = server
    secret_store(root)
    store = root / "acme" / "swapped"
    store.mkdir()
    with open(store / "0.jsonl", "w", encoding="utf-8") as f:
        for i, t in enumerate(sms(1100, offset=6000)):  # three chunks: the swap lands long before file 1
            f.write(json.dumps({"id": i, "text": t}) + "\n")
    (store / "1.jsonl").write_text(json.dumps({"id": "late", "text": "acme's last ticket"}) + "\n")
    r = client.post("/jobs", json={"source": "swapped", "classifiers": ["spam"], "output": "swapped.jsonl"},
                    headers=ACME)
    assert r.status_code == 202, r.text
    # the link is made in a folder beside the store (the same depth, so the same relative target) and
    # renamed over the file in one step: made inside the store, a job that lists the folder in between
    # saw the link under its temporary name (which it refused too, naming that name instead)
    beside = root / "acme" / "staging"
    beside.mkdir()
    (beside / "1.swap").symlink_to("../../globex/secret.jsonl")
    (beside / "1.swap").replace(store / "1.jsonl")
    done = wait_for(client, r.json()["job"]["id"], ACME)
    assert done["state"] == "failed", done
    assert done["error"]["error_type"] == "forbidden"
    assert "'swapped/1.jsonl' leads outside your scoring folder" in done["error"]["error"]
    assert str(root) not in json.dumps(done)
    assert not (root / "acme" / "swapped.jsonl").exists() and not (root / "acme" / "swapped.rejects.jsonl").exists()
    assert not (root / "acme" / "swapped.jsonl.partial").exists()  # a failed job leaves no partial output behind
    assert nothing_of_the_secret_in(root / "acme")


def test_bom_crlf_invisible_and_lone_surrogate_rows_over_http(server):
    _, client, root = server
    texts = sms(20, offset=8000)
    lines = [json.dumps({"id": f"w{i}", "text": t}) for i, t in enumerate(texts)]
    lines += ['{"id": "zw", "text": "\\u200b\\u200c"}', '{"id": "half", "text": "\\ud83d"}']  # JSON escapes
    (root / "acme" / "windows.jsonl").write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8"))
    r = client.post("/jobs", json={"source": "windows.jsonl", "classifiers": ["spam"], "output": "windows.jsonl.out",
                                   "format": "jsonl"}, headers=ACME)
    assert r.status_code == 202, r.text
    done = wait_for(client, r.json()["job"]["id"], ACME)
    assert done["state"] == "succeeded", done["error"]
    assert done["report"]["scored"] == 20  # the first record too, BOM and all
    assert done["report"]["rejects_by_reason"] == {"no visible content": 1,
                                                   "text is not valid Unicode (lone surrogate)": 1}


def test_bad_requests_are_refused_before_a_job_exists(server):
    _, client, root = server
    (root / "acme" / "cols.csv").write_text("doc,body\n1,hello\n")
    cases = [
        ({"source": "missing.jsonl", "classifiers": ["spam"]}, 404, "does not exist in your scoring folder"),
        ({"source": "cols.csv", "classifiers": ["nope"], "id_col": "doc", "text_col": "body"}, 404, "nope"),
        ({"source": "cols.csv", "classifiers": ["spam"]}, 422,
         "cols.csv: no id column 'id' (columns: doc, body); name it with id_col"),
        ({"source": "cols.csv", "classifiers": ["spam"], "id_col": "doc", "text_col": "body", "output": "x.txt"},
         422, "output format"),
        ({"source": "cols.csv", "classifier": ["spam"]}, 422, "classifier"),
        ({"source": ".", "classifiers": ["spam"], "output": "inside.parquet"}, 422, "inside the source"),
    ]
    before = len(client.get("/jobs", headers=ACME).json()["jobs"])
    for body, status, text in cases:
        r = client.post("/jobs", json=body, headers=ACME)
        assert r.status_code == status, (body, r.text)
        assert text in r.json()["error"] and str(root) not in r.text, (body, r.text)
    assert len(client.get("/jobs", headers=ACME).json()["jobs"]) == before
    r = client.post("/jobs", json={"source": "few.jsonl", "classifiers": ["spam"]}, headers=GLOBEX)
    assert r.status_code == 404  # globex's folder has no few.jsonl, and acme's spam is not globex's


def test_cancel_stops_a_running_job_and_leaves_nothing_half_written(server):
    _, client, root = server
    with open(root / "acme" / "big.jsonl", "w", encoding="utf-8") as f:
        for i, t in enumerate(sms(1200, offset=1000)):
            f.write(json.dumps({"id": i, "text": t}) + "\n")
    job = client.post("/jobs", json={"source": "big.jsonl", "classifiers": ["spam"], "output": "big.parquet"},
                      headers=ACME).json()["job"]
    running_job = wait_for(client, job["id"], ACME, states=("running", "succeeded"))
    assert running_job["state"] == "running"
    # live traffic is served while the job holds its own lane
    r = client.post("/classify", json={"texts": ["Is the server down?"], "classifiers": ["spam"]}, headers=ACME)
    assert r.status_code == 200
    r = client.delete(f"/jobs/{job['id']}", headers=ACME)
    assert r.status_code == 202 and r.json()["job"]["state"] in ("cancelling", "cancelled")
    done = wait_for(client, job["id"], ACME)
    assert done["state"] == "cancelled"
    assert not (root / "acme" / "big.parquet").exists()
    assert not (root / "acme" / "big.parquet.partial").exists()


def test_scoring_is_off_without_a_scoring_root(client):
    r = client.post("/jobs", json={"source": "a.jsonl", "classifiers": ["spam"]})
    assert r.status_code == 403 and "HEADFLEET_SCORING_ROOT" in r.json()["error"]


def test_a_job_running_when_the_service_stops_resumes_at_the_next_start(minilm, tmp_path):
    root, data = tmp_path / "root", tmp_path / "data"
    (root / "default").mkdir(parents=True)
    with open(root / "default" / "docs.jsonl", "w", encoding="utf-8") as f:
        for i, t in enumerate(sms(1100, offset=3000)):
            f.write(json.dumps({"id": i, "text": t}) + "\n")
    with running(minilm, data, scoring_root=root) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        job = client.post("/jobs", json={"source": "docs.jsonl", "classifiers": ["spam"], "output": "o.jsonl"}).json()
        job_id = job["job"]["id"]
        deadline = time.monotonic() + 300
        while client.get(f"/jobs/{job_id}").json()["job"]["progress"]["documents"] < 512:  # one chunk committed
            assert time.monotonic() < deadline
            time.sleep(0.2)
    with running(minilm, data, scoring_root=root) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        done = wait_for(client, job_id, {})
        assert done["state"] == "succeeded" and done["report"]["runs"] == 2
        assert done["report"]["documents"] == 1100
    ids = [json.loads(line)["id"] for line in (root / "default" / "o.jsonl").read_text().splitlines()]
    assert ids == [str(i) for i in range(1100)]  # JSONL ids are written as strings, once each
