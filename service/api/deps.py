"""Dependencies every controller takes through ``Provide``: the service and the caller's tenant."""

from __future__ import annotations

from litestar import Request

from headfleet.service.auth import key_from_headers
from headfleet.service.state import Service


async def provide_service(request: Request) -> Service:
    return request.app.state.service


async def provide_tenant(request: Request) -> str:
    """The tenant the API key maps to (``default`` in single-tenant mode); 401 otherwise."""
    return request.app.state.service.keys.tenant_for(key_from_headers(request.headers))


def require_admin(request: Request) -> Service:
    service: Service = request.app.state.service
    service.keys.require_admin(key_from_headers(request.headers))
    return service
