"""``/dashboard``: the HTML pages, the login form and logout.

| route | who | what |
|---|---|---|
| ``GET /dashboard`` | anyone | 303 to the caller's start page (tenant overview, the fleet for the admin key, else the login form) |
| ``GET/POST /dashboard/login`` | anyone | the form (sets the CSRF cookie); the POST takes ``key`` and ``csrf`` as a form and answers 303 with the session cookie |
| ``POST /dashboard/logout`` | a session | clears the session cookie; 303 to the login form |
| ``GET /dashboard/fleet`` | admin | every tenant (paged, ``?q=&page=``), the fleet's cache totals, tier bytes, scheduler counters |
| ``GET /dashboard/t/{tenant}`` | that tenant, admin | cache figures and charts, classifiers (paged, ``?q=&page=``), experiments |
| ``GET /dashboard/t/{tenant}/classifiers/{ref}`` | that tenant, admin | versions, aliases, candidate; monitor windows, alerts, retrains; shadow; experiments |
| ``GET /dashboard/t/{tenant}/experiments/{id}`` | that tenant, admin | arms, lift with its CI, tests, guardrails, recommendation |
| ``GET /dashboard/static/dashboard.css`` | anyone | the one stylesheet (served from the installed package) |

A page asked for without a valid session (none, expired, tampered, or its key revoked) answers 303
to the login form. Errors are the service's own: the domain error table gives the status and
``{"error", "error_type"}``; a browser (``Accept: text/html``) gets the same status, message and
type as an HTML page (the login form again for a refused key), any other client the JSON body.
Another tenant's tenant page, classifier or experiment is a 404 that reads like a made-up one.
In single-tenant mode (no keys) there is nothing to log in with: every page is tenant ``default``'s.
Pages carry no script; the Content-Security-Policy forbids it.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.resources
import json
import time
from typing import Annotated, Any
from urllib.parse import urlsplit

import jinja2
from litestar import Controller, MediaType, Request, Response, get, post
from litestar.datastructures import Cookie
from litestar.di import NamedDependency
from litestar.exceptions import HTTPException, ValidationException
from litestar.params import FromPath, QueryParameter
from litestar.response import Redirect

from headfleet.errors import ForbiddenError, HeadfleetError, NotFoundError, UnauthorizedError, ValidationError
from headfleet.names import TIER_NAMES
from headfleet.service import errors as house
from headfleet.service.auth import SINGLE_TENANT, digest
from headfleet.service.dashboard import charts, data
from headfleet.service.dashboard.session import (COOKIE_PATH, CSRF_COOKIE, CSRF_SECONDS, SESSION_COOKIE, Session,
                                                 Signer, load_secret)
from headfleet.service.peers import every_tenant, read_group
from headfleet.service.state import Service

MAX_KEY_CHARS = 512
MAX_FORM_BYTES = 8192
HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": ("default-src 'none'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
                                "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # not no-referrer: Chromium then sends "Origin: null" on form posts
    "X-Frame-Options": "DENY",
}


# -- formatting (the browser tests read the same rules back) --------------------------------------
def fmt(value: Any, kind: str = "count") -> str:
    """How a figure is written: ``count`` 1,234; ``rate`` 12.5 %; ``num`` 0.123; ``text`` as is; None "n/a"."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if kind == "count":
        return f"{int(value):,}"
    if kind == "rate":
        return f"{float(value) * 100:.1f} %"
    if kind == "num":
        return f"{float(value):.3f}"
    return str(value)


def when(value: Any) -> str:
    """A time as the API writes it: ISO 8601 strings as they are, epoch seconds as ISO UTC."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(value))
    return "n/a" if value is None else str(value)


@functools.lru_cache(maxsize=1)
def _templates() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("headfleet.service.dashboard", "templates"),
                             autoescape=True, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = fmt
    env.filters["when"] = when
    env.filters["tojson_attr"] = lambda v: json.dumps(v, sort_keys=True)
    env.globals["tiers"] = TIER_NAMES
    return env


def _page(template: str, status: int = 200, cookies: list[Cookie] | None = None, **context: Any) -> Response:
    body = _templates().get_template(template).render(**context)
    return Response(body, status_code=status, media_type=MediaType.HTML, headers=HEADERS, cookies=cookies or [])


def _wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


def _house_response(request: Request, exc: Exception) -> Response:
    """The service's own error response for ``exc`` (counted there), from its one table."""
    for cls in type(exc).__mro__:
        handler = house.HANDLERS.get(cls)
        if handler is not None:
            return handler(request, exc)
    return house.on_unexpected(request, exc)


def on_error(request: Request, exc: Exception) -> Response:
    """Dashboard errors: the house status and body; rendered as a page for a browser."""
    resp = _house_response(request, exc)
    if not _wants_html(request):
        return resp
    body = resp.content if isinstance(resp.content, dict) else {"error": str(exc), "error_type": "internal_error"}
    if request.url.path.rstrip("/") == f"{COOKIE_PATH}/login" and request.method == "POST":
        return _login_page(request, status=resp.status_code, error=body)
    ctx = _dashboard(request)
    return _page("error.html", status=resp.status_code, status_code=resp.status_code, error=body,
                 session=_session(request, ctx), title=f"Error {resp.status_code}")


# -- sessions ----------------------------------------------------------------------------------------
class _Dashboard:
    """Per-app dashboard state: the signer (its secret from the data folder)."""

    def __init__(self, service: Service):
        self.signer = Signer(load_secret(service.settings.data_dir))


def _dashboard(request: Request) -> _Dashboard:
    state = request.app.state
    ctx = getattr(state, "dashboard", None)
    if ctx is None:
        ctx = state.dashboard = _Dashboard(state.service)
    return ctx


def _session(request: Request, ctx: _Dashboard) -> Session | None:
    """The request's valid session: signed, unexpired, and its key still configured."""
    keys = request.app.state.service.keys
    if keys.single_tenant:
        return Session(SINGLE_TENANT, "", 0)
    s = ctx.signer.verify(request.cookies.get(SESSION_COOKIE))
    if s is None:
        return None
    if s.admin:
        ok = keys.admin_digest is not None and s.kid == ctx.signer.admin_kid(keys.admin_digest)
    else:
        ok = any(k["key_id"] == s.kid for k in keys.tenants().get(s.tenant, []))
    return s if ok else None


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def _cookie(request: Request, key: str, value: str | None, max_age: int) -> Cookie:
    return Cookie(key=key, value=value or "", path=COOKIE_PATH, max_age=max_age, httponly=True, samesite="strict",
                  secure=_secure(request))


def _login_page(request: Request, status: int = 200, error: dict | None = None) -> Response:
    ctx = _dashboard(request)
    token = ctx.signer.csrf_token()
    return _page("login.html", status=status, csrf=token, error=error, session=None, title="Sign in",
                 cookies=[_cookie(request, CSRF_COOKIE, token, CSRF_SECONDS)])


def _to_login() -> Redirect:
    return Redirect(f"{COOKIE_PATH}/login", status_code=303, headers=HEADERS)


def _check_origin(request: Request) -> None:
    """A POST whose ``Origin`` names another host (or is ``null``) is refused (403); none sent: allowed
    (the CSRF token still has to match)."""
    origin = request.headers.get("origin")
    if origin is None:
        return
    # host and port only: behind a TLS-terminating proxy the browser's https origin reaches us as http
    host = request.headers.get("host", request.url.netloc)
    if origin == "null" or urlsplit(origin).netloc != host:
        raise ForbiddenError("cross-origin form post refused: sign in from this server's own login page")


def _tenant_allowed(request: Request, service: Service, session: Session, tenant: str) -> None:
    """A tenant session sees its own tenant only; the admin key sees every known tenant. Anything
    else is the same 404 as a tenant that does not exist."""
    if session.admin:
        if not data.tenant_exists(service, tenant):
            raise NotFoundError(f"no tenant {tenant!r}")
    elif session.tenant != tenant:
        raise NotFoundError(f"no tenant {tenant!r}")


def _tenant_session(request: Request, service: Service, tenant: str) -> Session | None:
    """The request's valid session (None: sign in again), checked to see ``tenant`` (404 otherwise)."""
    session = _session(request, _dashboard(request))
    if session is not None:
        _tenant_allowed(request, service, session, tenant)
    return session


PageQuery = Annotated[int, QueryParameter(ge=1, le=1_000_000)]
SearchQuery = Annotated[str, QueryParameter(max_length=100)]


class DashboardController(Controller):
    path = COOKIE_PATH
    include_in_schema = False  # HTML for people; every handler says so too (tests read the handler's own flag)
    exception_handlers = {HeadfleetError: on_error, ValidationException: on_error, HTTPException: on_error,
                          Exception: on_error}

    @get("/", include_in_schema=False)
    async def index(self, request: Request, service: NamedDependency[Service]) -> Redirect:
        session = _session(request, _dashboard(request))
        if session is None:
            return _to_login()
        target = "fleet" if session.admin else f"t/{session.tenant}"
        return Redirect(f"{COOKIE_PATH}/{target}", status_code=303, headers=HEADERS)

    @get("/login", include_in_schema=False)
    async def login_form(self, request: Request, service: NamedDependency[Service]) -> Response:
        if service.keys.single_tenant:
            return _to_login_done()
        return _login_page(request)

    @post("/login", status_code=303, include_in_schema=False)
    async def login(self, request: Request, service: NamedDependency[Service]) -> Response:
        """Form ``key`` and ``csrf``: 303 to ``/dashboard`` with the session cookie; 401 for a key that
        maps to nobody, 403 for a missing or stale CSRF token or a foreign ``Origin``, 422 for a body
        that is not a form with those fields."""
        _check_origin(request)
        ctype = request.headers.get("content-type", "")
        if not (ctype.startswith("application/x-www-form-urlencoded") or ctype.startswith("multipart/form-data")):
            raise ValidationError("the login takes a form (application/x-www-form-urlencoded) with 'key' and 'csrf'")
        if len(await request.body()) > MAX_FORM_BYTES:
            raise ValidationError(f"the login form is larger than {MAX_FORM_BYTES} bytes")
        form = await request.form()
        key, token = form.get("key"), form.get("csrf")
        if not isinstance(key, str) or not isinstance(token, str):
            raise ValidationError("the login form needs the fields 'key' and 'csrf'", param="key")
        ctx = _dashboard(request)
        if not ctx.signer.csrf_ok(token, request.cookies.get(CSRF_COOKIE)):
            raise ForbiddenError("the login form expired or was not served here: reload the login page and sign in")
        key = key.strip()
        if not key or len(key) > MAX_KEY_CHARS:
            raise UnauthorizedError("enter an API key (at most 512 characters)")
        keys = service.keys
        if keys.single_tenant:
            return _to_login_done()
        if keys.is_admin(key):
            value = ctx.signer.issue(None, ctx.signer.admin_kid(keys.admin_digest))
        else:
            tenant = keys.tenant_for(key)  # UnauthorizedError for a key that maps to nobody
            value = ctx.signer.issue(tenant, digest(key)[:12])
        return Redirect(COOKIE_PATH, status_code=303, headers=HEADERS, cookies=[
            _cookie(request, SESSION_COOKIE, value, ctx.signer.session_seconds),
            _cookie(request, CSRF_COOKIE, None, 0)])

    @post("/logout", status_code=303, include_in_schema=False)
    async def logout(self, request: Request) -> Response:
        """Clears the session cookie (whatever state it was in); 303 to the login form."""
        _check_origin(request)
        return Redirect(f"{COOKIE_PATH}/login", status_code=303, headers=HEADERS,
                        cookies=[_cookie(request, SESSION_COOKIE, None, 0)])

    @get("/static/{file_name:str}", include_in_schema=False)
    async def static(self, file_name: FromPath[str]) -> Response:
        if file_name != "dashboard.css":
            raise NotFoundError(f"no dashboard asset {file_name!r}")
        css = _stylesheet()
        return Response(css, media_type="text/css", headers={"Cache-Control": "public, max-age=3600",
                                                              "X-Content-Type-Options": "nosniff"})

    @get("/fleet", include_in_schema=False)
    async def fleet(self, request: Request, service: NamedDependency[Service], q: SearchQuery = "",
                    page: PageQuery = 1) -> Response:
        session = _session(request, _dashboard(request))
        if session is None:
            return _to_login()
        if not session.admin:
            raise ForbiddenError("the fleet view needs the admin key")
        per = await every_tenant(service, getattr(request.app.state, "peers", None))
        view = await asyncio.to_thread(data.fleet_view, service, per)
        listing = data.paginate(view["tenants"], q, page)
        ranked = sorted(((t, s["computed"], s["embeddings_avoided"]) for t, s in view["stats"].items()),
                        key=lambda r: -(r[1] + r[2]))
        chart = await asyncio.to_thread(charts.fleet_tenants, ranked) if ranked else None
        return _page("fleet.html", session=session, title="Fleet", fleet=view, listing=listing, chart=chart,
                     batch=service.settings.batch_size,
                     forwards_saved=data.forwards_saved(view["total"]["embeddings_avoided"],
                                                        service.settings.batch_size))

    @get("/t/{tenant_name:str}", include_in_schema=False)
    async def tenant(self, request: Request, service: NamedDependency[Service], tenant_name: FromPath[str],
                     q: SearchQuery = "", page: PageQuery = 1) -> Response:
        session = _tenant_session(request, service, tenant_name)
        if session is None:
            return _to_login()

        group = await read_group(getattr(request.app.state, "peers", None), tenant_name)

        def gather() -> dict[str, Any]:
            stats = data.stats_view(service, tenant_name, group)
            names = data.classifier_names(service.engine.registry, tenant_name)
            listing = data.paginate(names, q, page)
            counts = service.engine.stats if group is None else service.engine.stats.merged(tenant_name, group[1])
            series = data.minute_series(counts, tenant_name)
            return {"stats": stats, "listing": listing,
                    "rows": data.classifier_rows(service, tenant_name, listing.items, stats),
                    "experiments": data.experiments_view(service, tenant_name),
                    "series": series,
                    "charts": {"windows": charts.cache_windows(stats, TIER_NAMES),
                               "avoided": charts.computed_avoided(stats),
                               "minutes": charts.cache_minutes(series, TIER_NAMES) if series else None}}

        view = await asyncio.to_thread(gather)
        batch = service.settings.batch_size
        return _page("tenant.html", session=session, tenant=tenant_name, title=f"Tenant {tenant_name}", batch=batch,
                     forwards_saved={k: data.forwards_saved(w["embeddings_avoided"], batch) for k, w in
                                     [("since_start", view["stats"]["since_start"]), *view["stats"]["windows"].items()]},
                     **view)

    @get("/t/{tenant_name:str}/classifiers/{ref:str}", include_in_schema=False)
    async def classifier(self, request: Request, service: NamedDependency[Service], tenant_name: FromPath[str],
                         ref: FromPath[str]) -> Response:
        session = _tenant_session(request, service, tenant_name)
        if session is None:
            return _to_login()

        group = await read_group(getattr(request.app.state, "peers", None), tenant_name)

        def gather() -> dict[str, Any]:
            view = data.classifier_view(service, tenant_name, ref)
            stats = data.stats_view(service, tenant_name, group)
            windows, settings = view["monitor"]["windows"], view["monitor"]["settings"]
            view["cache"] = stats["since_start"].get("classifiers", {}).get(view["name"])
            view["charts"] = {} if not windows else {
                "traffic": charts.window_traffic(windows), "labels": charts.window_labels(windows),
                "drift": charts.window_drift(windows, settings),
                "canary": charts.window_canary(windows, settings, view["holdout_accuracy"])}
            view["lift_charts"] = {x["id"]: charts.experiment_lift(x) for x in view["experiments"]}
            return view

        view = await asyncio.to_thread(gather)
        return _page("classifier.html", session=session, tenant=tenant_name, ref=ref,
                     title=f"Classifier {view['name']}", **view)

    @get("/t/{tenant_name:str}/experiments/{exp_id:str}", include_in_schema=False)
    async def experiment(self, request: Request, service: NamedDependency[Service], tenant_name: FromPath[str],
                         exp_id: FromPath[str]) -> Response:
        session = _tenant_session(request, service, tenant_name)
        if session is None:
            return _to_login()

        def gather() -> tuple[dict, str, str]:
            report = service.experiments.report(tenant_name, exp_id)
            return report, charts.experiment_lift(report), charts.experiment_looks(report.get("looks") or [])

        report, chart, looks_chart = await asyncio.to_thread(gather)
        return _page("experiment.html", session=session, tenant=tenant_name, title=f"Experiment {exp_id}",
                     x=report, chart=chart, looks_chart=looks_chart)


def _to_login_done() -> Redirect:
    """Single-tenant mode has no keys to sign in with: straight to the tenant's page."""
    return Redirect(f"{COOKIE_PATH}/t/{SINGLE_TENANT}", status_code=303, headers=HEADERS)


@functools.lru_cache(maxsize=1)
def _stylesheet() -> str:
    return importlib.resources.files("headfleet.service.dashboard").joinpath("static/dashboard.css").read_text()
