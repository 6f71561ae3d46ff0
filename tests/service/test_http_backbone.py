"""The backbone gate over HTTP: ``POST /admin/backbone/plan`` as a job (a real child process running
``headfleet backbone plan``, with progress, cancel and resume), and ``POST /admin/backbone/reload``
swapping a real ONNX int8 backbone in under live traffic without failing a request."""

from __future__ import annotations

import random
import shutil
import threading
import time

import pytest

from headfleet.embedder import Embedder
from headfleet.engine import Engine
from headfleet.heads import examples_from_records, load_examples
from headfleet.settings import Settings

from tests.service.http_server import as_, running

TENANT_KEY, OTHER_KEY, ADMIN_KEY = "key-acme", "key-bob", "key-admin"


@pytest.fixture(scope="module")
def int8(onnx_cache):
    return Embedder.load(max_length=256, batch_size=32, device="cpu", backend="onnx", precision="int8",
                         cache_dir=onnx_cache)


@pytest.fixture
def data(minilm, int8, onnx_cache, sms_spam_path, tmp_path):
    """A data folder with two SMS spam classifiers of tenant acme (stored data, so they can be
    compared), and the int8 export already in its ONNX folder (the service would export it itself)."""
    folder = tmp_path / "data"
    sms = load_examples(sms_spam_path)
    rng = random.Random(5)
    with Engine.open(Settings(data_dir=folder, device="cpu", faiss_store=False), embedder=minilm) as eng:
        for name, kind in (("spam", "logreg"), ("spam-mlp", "mlp")):
            idx = rng.sample(range(len(sms)), 200)
            eng.train("acme", name, examples_from_records(
                [{"text": sms.texts[i], "label": sms.labels[i]} for i in idx]), kind=kind)
    (folder / "onnx").mkdir()
    for f in onnx_cache.glob("*int8*"):
        shutil.copy(f, folder / "onnx" / f.name)
    return folder


def _serve(minilm, data):
    return running(minilm, data, api_keys=f"acme:{TENANT_KEY},bob:{OTHER_KEY}", admin_key=ADMIN_KEY)


def _wait(admin, until: set[str], timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = admin.get("/admin/backbone/plan").json()
        if job["state"] in until:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.2)


def test_a_plan_job_reports_progress_cancels_resumes_and_refuses_what_is_not_a_plan(minilm, data):
    with _serve(minilm, data) as srv, as_(srv, ADMIN_KEY) as admin, as_(srv, TENANT_KEY) as tenant:
        assert admin.get("/admin/backbone/plan").status_code == 404  # none started yet
        for body, field in (({"backend": "onnx"}, "tenant"),  # neither tenant nor all_tenants
                            ({"backend": "onnx", "tenant": "acme", "all_tenants": True}, "tenant"),
                            ({"tenant": "acme"}, "to"),  # no candidate named
                            ({"backend": "onnx", "tenant": "acme", "max_drop": 2}, "max_drop"),
                            ({"backend": "tpu", "tenant": "acme"}, None)):
            r = admin.post("/admin/backbone/plan", json=body)
            assert r.status_code == 422, (body, r.text)
            assert r.json()["error_type"] == "validation_error"
            if field:
                assert field in r.json()["error"], r.json()
        for body, field in (({"backend": "onnx", "tenant": "nobody"}, "tenant"),  # nothing to plan
                            ({"to": str(data), "tenant": "acme"}, "to")):  # not a model folder
            r = admin.post("/admin/backbone/plan", json=body)
            assert r.status_code == 404 and field in r.json()["error"], (body, r.text)
        assert tenant.post("/admin/backbone/plan", json={"backend": "onnx", "precision": "int8",
                                                          "tenant": "acme"}).status_code == 403

        body = {"backend": "onnx", "precision": "int8", "tenant": "acme"}
        started = admin.post("/admin/backbone/plan", json=body)
        assert started.status_code == 202, started.text
        assert started.json()["state"] == "running"
        again = admin.post("/admin/backbone/plan", json=body)  # the child is still loading two backbones
        assert again.status_code == 409 and again.json()["error_type"] == "conflict"
        cancelled = admin.delete("/admin/backbone/plan")
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
        assert admin.delete("/admin/backbone/plan").status_code == 409  # nothing running now

        assert admin.post("/admin/backbone/plan", json=body).status_code == 202  # the same request resumes
        job = _wait(admin, {"done", "failed"})
        assert job["state"] == "done", job
        assert job["progress"]["done"] == job["progress"]["total"] == 2 and job["progress"]["fraction"] == 1.0
        report = job["report"]
        assert report["from"]["backend"] == "torch" and report["to"]["backend"] == "onnx"
        assert report["summary"]["classifiers"] == 2 and report["summary"]["pass"] == 2, report
        assert report["attention"] == [] and report["apply"].startswith("headfleet backbone apply ")
        full = admin.get("/admin/backbone/plan/report").json()
        assert {r["key"] for r in full["classifiers"]} == {"acme/spam@1", "acme/spam-mlp@1"}
        assert all(r["holdout"]["negative_flips"] >= 0 and r["verdict"] == "pass" for r in full["classifiers"])


def test_reload_swaps_the_backbone_and_its_aliases_under_traffic_and_rollback_goes_back(minilm, int8, data):
    from headfleet.lifecycle.backbone_apply import apply, rollback
    from headfleet.lifecycle.backbone_plan import plan

    out = data / "int8-plan.json"
    with Engine.open(Settings(data_dir=data, device="cpu", faiss_store=False), embedder=minilm) as cur, \
            Engine.open(Settings(data_dir=data, device="cpu", faiss_store=False), embedder=int8) as cand:
        plan(cur, cand, ["acme"], out=out)
    texts = ["WINNER!! You have been selected for a free cruise, call 09061701461 now",
             "are we still on for lunch tomorrow?"]
    with _serve(minilm, data) as srv, as_(srv, ADMIN_KEY) as admin:
        same = admin.post("/admin/backbone/reload")  # nothing recorded yet: the serving backbone stays
        assert same.status_code == 200 and same.json()["reloaded"] is False
        settings = Settings(data_dir=data, device="cpu")
        apply(out, settings, open_engine=lambda s: Engine.open(s, embedder=int8))

        answers, failures, stop = [], [], threading.Event()

        def traffic():
            with as_(srv, TENANT_KEY) as client:
                while not stop.is_set():
                    r = client.post("/classify", json={"texts": texts, "classifiers": ["spam", "spam-mlp"]})
                    if r.status_code != 200:
                        failures.append(r.text)
                    else:
                        answers.append(r.json())

        workers = [threading.Thread(target=traffic) for _ in range(2)]
        for w in workers:
            w.start()
        try:
            while len(answers) < 5 and not failures:
                time.sleep(0.02)
            before = admin.get("/info").json()["backbone"]
            with as_(srv, TENANT_KEY) as acme:
                report = acme.get("/stats").json()
            r = admin.post("/admin/backbone/reload")
            n = len(answers)
            while len(answers) < n + 5 and not failures:
                time.sleep(0.02)
        finally:
            stop.set()
            for w in workers:
                w.join(60)
        assert r.status_code == 200, r.text
        assert not failures, failures[:3]
        done = r.json()
        assert done["reloaded"] is True and done["from"]["fingerprint"] == before["fingerprint"]
        assert done["to"]["fingerprint"] == int8.fingerprint and done["to"]["backend"] == "onnx"
        with as_(srv, TENANT_KEY) as acme:  # the cache-hit report carries on over the reload
            carried = acme.get("/stats").json()
        assert carried["uptime_s"] >= report["uptime_s"]
        assert carried["since_start"]["lookups"] >= report["since_start"]["lookups"] > 0
        after = admin.get("/info").json()["backbone"]
        assert after["fingerprint"] == int8.fingerprint and after["source"].startswith("data folder")
        versions = [a["results"][0]["classifications"]["spam"]["version"] for a in answers]
        # the old versions until the swap, the refit ones after it: never a mix going backwards
        assert versions[0] == 1 and versions[-1] > 1
        first_new = versions.index(versions[-1])
        assert set(versions[:first_new]) == {1} and set(versions[first_new:]) == {versions[-1]}
        labels = {a["results"][0]["classifications"]["spam"]["label"] for a in answers}
        assert len(labels) == 1  # the refit head on the new backbone answers as the old one did

        rollback(settings)
        back = admin.post("/admin/backbone/reload")
        assert back.status_code == 200 and back.json()["reloaded"] is True
        assert back.json()["to"]["fingerprint"] == minilm.fingerprint
        with as_(srv, TENANT_KEY) as client:
            got = client.post("/classify", json={"texts": texts, "classifiers": ["spam"]}).json()
        assert got["results"][0]["classifications"]["spam"]["version"] == 1
        with as_(srv, OTHER_KEY) as bob:  # another tenant's view is unchanged by acme's upgrade
            assert bob.get("/classifiers").json()["classifiers"] == []
        assert as_(srv, TENANT_KEY).post("/admin/backbone/reload").status_code == 403


def test_the_plan_api_accepts_every_precision_the_cli_and_the_backends_know():
    """POST /admin/backbone/plan's precision field is written out by hand (a Literal): it must name
    exactly the precisions of the backend table, as the CLI's --precision choices do."""
    import typing

    from headfleet.service.api.admin import PlanRequest
    from headfleet.settings import PRECISIONS

    field = typing.get_type_hints(PlanRequest)["precision"]
    literal = next(a for a in typing.get_args(field) if a is not type(None))
    assert set(typing.get_args(literal)) == set(PRECISIONS) and "w8a8" in PRECISIONS
