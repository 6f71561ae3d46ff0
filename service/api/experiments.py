"""Shadows and A/B experiments (``headfleet.lifecycle.shadow``, ``headfleet.lifecycle.experiments``)."""

from __future__ import annotations

import asyncio

from litestar import Controller, Response, delete, get, post, put
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter
from typing import Annotated

from headfleet.service.schemas import ExperimentRequest, OutcomesRequest, ShadowRequest, StopRequest
from headfleet.service.state import Service


class ShadowController(Controller):
    path = "/classifiers/{name:str}/shadow"
    tags = ["experiments"]

    @put("/", summary="Score another version of the classifier on live traffic, without answering with it")
    async def set_shadow(self, name: FromPath[str], data: JSONBody[ShadowRequest], service: NamedDependency[Service],
                         tenant: NamedDependency[str]) -> dict:
        """``{"version": 4 | "candidate", "sample"?: 0.1}`` (``sample`` only, and required, for a shadow
        that costs a backbone forward: a LoRA adapter is involved). Replaces an earlier shadow."""
        return await asyncio.to_thread(service.shadows.set, tenant, name, data.body())

    @get("/", summary="Agreement, flips and (with /feedback labels) accuracy of live vs. shadow")
    async def report(self, name: FromPath[str], service: NamedDependency[Service],
                     tenant: NamedDependency[str]) -> dict:
        return await asyncio.to_thread(service.shadows.report, tenant, name)

    @delete("/", status_code=200, summary="Stop the shadow (returns its last report)")
    async def stop(self, name: FromPath[str], service: NamedDependency[Service], tenant: NamedDependency[str]) -> dict:
        return await asyncio.to_thread(service.shadows.remove, tenant, name)


class ExperimentsController(Controller):
    path = "/experiments"
    tags = ["experiments"]

    @post("/", status_code=201, summary="Start a pre-registered A/B experiment between two versions")
    async def create(self, data: JSONBody[ExperimentRequest], service: NamedDependency[Service],
                     tenant: NamedDependency[str]) -> Response:
        record = await asyncio.to_thread(service.experiments.create, tenant, data.body())
        return Response(record, status_code=201, headers={"Location": f"/experiments/{record['id']}"})

    @get("/", summary="This tenant's experiments, newest first (paged)")
    async def list_experiments(self, service: NamedDependency[Service], tenant: NamedDependency[str],
                               limit: Annotated[int, QueryParameter(ge=1, le=500)] = 50,
                               after: Annotated[str | None, QueryParameter()] = None) -> dict:
        """``?limit=`` (1-500, default 50) per page; ``?after=<id>``: the page after that experiment
        (the previous page's ``next``)."""
        return await asyncio.to_thread(service.experiments.list, tenant, limit=limit, after=after)

    @get("/{exp_id:str}", summary="An experiment: arms, lift with its CI, Welch's t-test, SRM, sequential p, "
                                  "guardrails, slices, recommendation")
    async def show(self, exp_id: FromPath[str], service: NamedDependency[Service], tenant: NamedDependency[str]) -> dict:
        return await asyncio.to_thread(service.experiments.report, tenant, exp_id)

    @post("/{exp_id:str}/outcomes", status_code=200, summary="Outcomes of exposed units (retries with an item id are safe)")
    async def outcomes(self, exp_id: FromPath[str], data: JSONBody[OutcomesRequest], service: NamedDependency[Service],
                       tenant: NamedDependency[str]) -> dict:
        return await asyncio.to_thread(service.experiments.add_outcomes, tenant, exp_id, {"items": data.items})

    @post("/{exp_id:str}/stop", status_code=200, summary="Stop: promote (latest -> treatment) or roll back (latest -> control)")
    async def stop(self, exp_id: FromPath[str], data: JSONBody[StopRequest], service: NamedDependency[Service],
                   tenant: NamedDependency[str]) -> dict:
        return await asyncio.to_thread(service.experiments.stop, tenant, exp_id, data.decision)
