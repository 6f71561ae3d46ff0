"""Tenants, keys and shared cache namespaces, for the admin key only."""

from __future__ import annotations

import msgspec
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody
from litestar import Controller, delete, get, post, put

from headfleet.service.api.deps import admin_guard
from headfleet.service.state import Service


class NamespaceRequest(msgspec.Struct, forbid_unknown_fields=True):
    members: list[str]  # tenant names granted the namespace


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
    async def stats(self, service: NamedDependency[Service]) -> dict:
        e = service.engine
        return {"tiers": {"bytes": e.cache.nbytes(), "errors": dict(e.cache.tier_errors)},
                "tenants": {t: e.tenant_stats(t) for t in e.stats.tenants()},
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

    @delete("/namespaces/{namespace:str}", status_code=200, summary="Delete a shared namespace")
    async def delete_namespace(self, service: NamedDependency[Service], namespace: FromPath[str]) -> dict:
        """Its members lose access at once; vectors cached under it age out of the tiers."""
        service.namespaces.delete(namespace)
        return {"deleted": namespace}
