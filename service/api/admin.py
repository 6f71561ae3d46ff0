"""Tenants, keys and shared cache namespaces, for the admin key only."""

from __future__ import annotations

from typing import Literal

import msgspec
from litestar import Controller, Request, delete, get, post, put
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from headfleet.errors import ValidationError
from headfleet.names import check_name
from headfleet.service.api.deps import admin_guard
from headfleet.service.peers import every_tenant
from headfleet.service.state import Service


class NamespaceRequest(msgspec.Struct, forbid_unknown_fields=True):
    members: list[str]  # tenant names granted the namespace


class PlanRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /admin/backbone/plan``: the options of ``headfleet backbone plan``."""

    to: str | None = None  # the candidate model folder on the server (default: the serving one)
    backend: Literal["torch", "onnx"] | None = None  # default: the serving backbone's
    precision: Literal["fp32", "int8", "w8a8", "fp16"] | None = None  # settings.PRECISIONS
    tenant: str | None = None  # exactly one of tenant / all_tenants
    all_tenants: bool = False
    max_drop: float = 0.01  # accuracy drop allowed on the holdout or the canary, a fraction
    max_negative_flips: float = 0.02  # right-to-wrong flips allowed, a fraction of the holdout

    def checked(self) -> dict:
        """The request as a dict; ValidationError naming the field when it is not a plan."""
        if (self.tenant is None) == (not self.all_tenants):
            raise ValidationError("give exactly one of 'tenant' (one tenant's classifiers) and 'all_tenants': true",
                                  param="tenant")
        if self.tenant is not None:
            check_name(self.tenant, "tenant")
        for name in ("max_drop", "max_negative_flips"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValidationError(f"{name} is a fraction from 0 to 1, got {value}", param=name)
        if self.to is not None and not 0 < len(self.to) <= 4096:
            raise ValidationError("'to' is a model folder's path of 1 to 4096 characters", param="to")
        if self.to is None and self.backend is None and self.precision is None:
            raise ValidationError("name the candidate backbone: 'to' (a model folder), 'backend' or 'precision'",
                                  param="to")
        return msgspec.structs.asdict(self)


class AdminController(Controller):
    path = "/admin"
    tags = ["admin"]
    guards = [admin_guard]

    @get("/tenants", summary="Tenants with their key ids")
    async def tenants(self, service: NamedDependency[Service]) -> dict:
        return {"tenants": service.keys.tenants()}

    @post("/tenants/{tenant_name:str}/keys", status_code=201, summary="Create an API key for a tenant")
    async def create_key(self, service: NamedDependency[Service], tenant_name: FromPath[str]) -> dict:
        """The key is in this response only; the service stores its SHA-256 digest."""
        return service.keys.create(tenant_name)

    @delete("/keys/{key_id:str}", status_code=200, summary="Revoke a key by its id")
    async def revoke(self, service: NamedDependency[Service], key_id: FromPath[str]) -> dict:
        entry = service.keys.revoke(key_id)
        return {"revoked": key_id, "tenant": entry["tenant"]}

    @get("/stats", summary="Every tenant's cache figures and bytes held per tier (operator view)")
    async def stats(self, request: Request, service: NamedDependency[Service]) -> dict:
        """Under ``serve --workers`` (or Ray replicas) the tenants' figures are the whole group's;
        tiers and scheduler are the answering process's."""
        e = service.engine
        return {"tiers": {"bytes": e.cache.nbytes(), "errors": dict(e.cache.tier_errors)},
                "tenants": await every_tenant(service, getattr(request.app.state, "peers", None)),
                "scheduler": {"batches": service.scheduler.batches, "rejected": service.scheduler.rejected,
                              "dropped_requests": service.scheduler.dropped_requests,
                              "dropped_texts": service.scheduler.dropped_texts}}

    @get("/namespaces", summary="Shared cache namespaces and their member tenants")
    async def namespaces(self, service: NamedDependency[Service]) -> dict:
        return {"namespaces": service.namespaces.list()}

    @put("/namespaces/{namespace:str}", summary="Create a shared namespace or replace its members")
    async def put_namespace(self, service: NamedDependency[Service], namespace: FromPath[str], data: JSONBody[NamespaceRequest]) -> dict:
        """Members may then send ``"namespace": "<namespace>"``: a text one member sent is a cache hit for
        the others. Every other tenant naming it gets 403."""
        return service.namespaces.put(namespace, data.members)

    @put("/namespaces/{namespace:str}/members/{tenant_name:str}", summary="Grant a namespace to a tenant")
    async def add_member(self, service: NamedDependency[Service], namespace: FromPath[str], tenant_name: FromPath[str]) -> dict:
        return service.namespaces.add_member(namespace, tenant_name)

    @delete("/namespaces/{namespace:str}/members/{tenant_name:str}", status_code=200,
            summary="Revoke a tenant's grant of a namespace")
    async def remove_member(self, service: NamedDependency[Service], namespace: FromPath[str], tenant_name: FromPath[str]) -> dict:
        return service.namespaces.remove_member(namespace, tenant_name)

    @post("/backbone/plan", status_code=202, summary="Start a backbone plan (headfleet backbone plan) as a job")
    async def start_plan(self, request: Request, service: NamedDependency[Service], data: JSONBody[PlanRequest]) -> dict:
        """Compares every aliased classifier version on the serving and a candidate backbone in a child
        process; ``GET /admin/backbone/plan`` shows its progress and, when done, the report. 409 while
        one runs; the same request after an interruption resumes it."""
        return request.app.state.plan_job.start(data.checked(), service.engine.registry)

    @get("/backbone/plan", summary="The backbone plan job: progress, and the report once done")
    async def get_plan(self, request: Request) -> dict:
        return request.app.state.plan_job.get()

    @get("/backbone/plan/report", summary="The last finished backbone plan, every classifier's figures")
    async def plan_report(self, request: Request) -> dict:
        return request.app.state.plan_job.report()

    @delete("/backbone/plan", status_code=200, summary="Cancel the running backbone plan (resumable)")
    async def cancel_plan(self, request: Request) -> dict:
        return request.app.state.plan_job.cancel()

    @post("/backbone/reload", status_code=200, summary="Serve the backbone the data folder records, without a restart")
    async def reload_backbone(self, request: Request) -> dict:
        """After ``headfleet backbone apply`` or ``rollback``: loads the recorded backbone beside the
        serving one, holds new requests while those in flight finish, then swaps the service (the
        backbone and its aliases together). 409 while a training job runs or another reload does.
        Under ``serve --workers`` (or Ray replicas) the other processes of the run follow, and the
        answer waits for them: ``workers`` says which followed, which failed and why, which are pending."""
        state = request.app.state
        out = await state.reloader.reload(request.app)
        if getattr(state, "peers", None) is not None:
            out = {**out, "workers": await state.peers.spread_reload(state.service.engine.embedder.fingerprint)}
        return out

    @delete("/namespaces/{namespace:str}", status_code=200, summary="Delete a shared namespace")
    async def delete_namespace(self, service: NamedDependency[Service], namespace: FromPath[str]) -> dict:
        """Its members lose access at once; vectors cached under it age out of the tiers."""
        service.namespaces.delete(namespace)
        return {"deleted": namespace}
