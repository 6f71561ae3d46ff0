"""Monitoring: feedback, canary sets, monitor settings and the monitor report (``headfleet.lifecycle``)."""

from __future__ import annotations

import asyncio

from litestar import Controller, Request, get, post, put
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from headfleet.service.request import convert, decode_json_body, uploaded_examples
from headfleet.service.schemas import CanaryRequest, FeedbackRequest, MonitorSettingsRequest
from headfleet.service.state import Service


class FeedbackController(Controller):
    path = "/feedback"
    tags = ["monitoring"]

    @post("/", status_code=200, summary="Labels for texts a classifier scored (feeds the canary and retraining)")
    async def feedback(self, data: JSONBody[FeedbackRequest], service: NamedDependency[Service],
                       tenant: NamedDependency[str]) -> dict:
        """``{"classifier": "spam", "items": [{"text", "label"}]}`` -> ``{"accepted": n}``. The last label
        sent for a text wins; a label outside the classifier's labels refuses the whole body (422)."""
        n = await asyncio.to_thread(service.monitor.add_feedback, tenant, data.classifier, data.items)
        return {"accepted": n}


class MonitorController(Controller):
    path = "/classifiers/{name:str}"
    tags = ["monitoring"]

    @put("/canary", summary="Set the classifier's canary set (JSON examples, or a CSV/JSONL upload)")
    async def set_canary(self, name: FromPath[str], request: Request, service: NamedDependency[Service],
                         tenant: NamedDependency[str]) -> dict:
        """JSON ``{"examples": [{"text", "label"}]}`` or ``multipart/form-data`` with a ``file`` (.csv
        with a header row, or .jsonl) and optional ``text_col``/``label_col``, as for training.
        -> ``{"classifier", "hash", "size", "per_label"}``."""
        items = await _canary_items(request, service, tenant, name)
        return await asyncio.to_thread(service.monitor.set_canary, tenant, name, items)

    @get("/canary", summary="The canary set: hash, size, per-label counts, rolling part")
    async def get_canary(self, name: FromPath[str], service: NamedDependency[Service],
                         tenant: NamedDependency[str]) -> dict:
        return await asyncio.to_thread(service.monitor.canary_info, tenant, name)

    @put("/monitor", summary="Enable or change monitoring (any subset of the settings)")
    async def configure(self, name: FromPath[str], data: JSONBody[MonitorSettingsRequest],
                        service: NamedDependency[Service], tenant: NamedDependency[str]) -> dict:
        settings = await asyncio.to_thread(service.monitor.configure, tenant, name, data.patch())
        return {"classifier": name.partition("@")[0], "settings": settings}

    @get("/monitor", summary="Closed windows with their signals, alerts, and the retrain state")
    async def report(self, name: FromPath[str], service: NamedDependency[Service],
                     tenant: NamedDependency[str]) -> dict:
        return await asyncio.to_thread(service.monitor.report, tenant, name)


async def _canary_items(request: Request, service: Service, tenant: str, name: str) -> list[dict]:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return convert(decode_json_body(await request.body()), CanaryRequest).examples
    form = await request.form()
    manifest = await asyncio.to_thread(service.engine.registry.resolve, tenant, name.partition("@")[0])
    multi = manifest["multi_label"]
    examples = await uploaded_examples(form, multi_label=multi, label_col="labels" if multi else "label",
                                       missing="multipart upload needs a 'file' part (.csv or .jsonl)")
    field = "labels" if multi else "label"
    return [{"text": t, field: lab} for t, lab in zip(examples.texts, examples.labels)]
