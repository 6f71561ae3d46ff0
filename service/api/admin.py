"""Tenants and keys, for the admin key only."""

from __future__ import annotations

from litestar.params import FromPath
from litestar import Controller, Request, delete, get, post

from headfleet.service.api.deps import require_admin


class AdminController(Controller):
    path = "/admin"
    tags = ["admin"]

    @get("/tenants", summary="Tenants with their key ids")
    async def tenants(self, request: Request) -> dict:
        service = require_admin(request)
        return {"tenants": service.keys.tenants()}

    @post("/tenants/{tenant_name:str}/keys", status_code=201, summary="Create an API key for a tenant")
    async def create_key(self, request: Request, tenant_name: FromPath[str]) -> dict:
        """The key is in this response only; the service stores its SHA-256 digest."""
        service = require_admin(request)
        return service.keys.create(tenant_name)

    @delete("/keys/{key_id:str}", status_code=200, summary="Revoke a key by its id")
    async def revoke(self, request: Request, key_id: FromPath[str]) -> dict:
        service = require_admin(request)
        entry = service.keys.revoke(key_id)
        return {"revoked": key_id, "tenant": entry["tenant"]}

    @get("/stats", summary="Every tenant's cache figures and bytes held per tier (operator view)")
    async def stats(self, request: Request) -> dict:
        service = require_admin(request)
        e = service.engine
        return {"tiers": {"bytes": e.cache.nbytes(), "errors": dict(e.cache.tier_errors)},
                "tenants": {t: e.tenant_stats(t) for t in e.stats.tenants()},
                "scheduler": {"batches": service.scheduler.batches, "rejected": service.scheduler.rejected,
                              "dropped_requests": service.scheduler.dropped_requests,
                              "dropped_texts": service.scheduler.dropped_texts}}
