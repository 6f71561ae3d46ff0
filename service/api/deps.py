"""Dependencies every controller takes through ``Provide``: the service and the caller's tenant."""

from __future__ import annotations

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler

from headfleet.service.auth import key_from_headers
from headfleet.service.state import Service


async def provide_service(request: Request) -> Service:
    return request.app.state.service


async def provide_tenant_alone(request: Request) -> str:
    """:func:`provide_tenant` for a handler that takes no ``service`` (``POST /classify`` reads it from
    the app state): one dependency resolution per request instead of two."""
    return await provide_tenant(request, request.app.state.service)


async def provide_tenant(request: Request, service: Service) -> str:
    """The tenant the API key maps to (``default`` in single-tenant mode); 401 otherwise.

    It takes ``service`` so Litestar resolves the two one after the other: two independent
    dependencies are resolved concurrently in an anyio task group, two task spawns per request
    (~0.1 ms, a sixth of a cached ``/classify``)."""
    return service.keys.tenant_for(key_from_headers(request.headers))


def admin_guard(connection: ASGIConnection, _handler: BaseRouteHandler) -> None:
    """Litestar guard: the admin key, or 401/403 (``KeyStore.require_admin`` says which and why)."""
    connection.app.state.service.keys.require_admin(key_from_headers(connection.headers))


def metrics_guard(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    """``/metrics``: open in single-tenant mode, the admin key's once keys are configured."""
    if not connection.app.state.service.keys.single_tenant:
        admin_guard(connection, handler)
