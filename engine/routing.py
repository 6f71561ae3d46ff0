"""Routing: the step where lifecycle features choose versions for a live request.

The engine knows nothing of experiments or shadows; it offers ``choosers`` (callables that see a
:class:`~headfleet.engine.types.Choice` before resolution and may re-point a ref, add a shadow
version or tag a ref's entries) and applies what they chose:

    choice = Choice(tenant, unit, refs)             # distinct refs as asked
    for chooser in choosers: chooser(choice)         # live traffic only; a failing chooser is logged
    resolved = resolve(targets.get(ref, ref)) for ref, answered as ref
    shadows  = resolve(shadows[ref]), answered as SHADOW_REF + ref     # scored, not answered
    plan(resolved + shadows) -> the same embedding groups -> ONE fleet predict per group
    settle(answer): shadow entries leave the answer (kept for observers), tags join each entry

A head shadow is therefore one more key in the group's batched head operation on the vectors the
request already has: no second forward. A shadow that fails to resolve (deleted, corrupt) is
dropped with a log line; the caller's answer never depends on it.
"""

from __future__ import annotations

import logging
from typing import Sequence

from headfleet.engine.types import ADAPTER_LOAD, SHADOW_REF, Choice, Resolved, Route, Scored

log = logging.getLogger(__name__)


class RoutingMixin:
    def route(self, tenant: str, classifiers: Sequence[str], errors: dict[str, dict] | None = None, *,
              unit: str | None = None, live: bool = True) -> Route:
        """Resolve and pin a request's classifiers after the choosers (``live`` only) ran.

        Raises what :meth:`resolve` raises for the refs asked; ``errors`` as there. The versions
        are pinned: pass ``route.every`` to :meth:`release` when the request completes."""
        refs = list(dict.fromkeys(classifiers))
        choice = Choice(tenant, unit, refs)
        if live:
            for chooser in self.choosers:
                try:
                    chooser(choice)
                except Exception:  # an experiment store outage must not cost the tenant its answer
                    self.chooser_failures += 1
                    log.exception("chooser %r failed; serving the request as asked", chooser)
                    choice = Choice(tenant, unit, refs)
        timing: dict[str, float] = {}
        resolved = [Resolved(*item) for item in
                    self.resolve(tenant, refs, errors, pin=True, targets=choice.targets or None, timing=timing)]
        shadows: list[Resolved] = []
        answered = {r.ref: r.key for r in resolved}
        for ref, target in choice.shadows.items():
            if ref not in answered:
                continue
            try:
                [item] = self.resolve(tenant, [target], pin=True, timing=timing)
            except Exception as exc:
                log.warning("shadow %s of %s/%s not scored: %s", target, tenant, ref, exc)
                continue
            if item[1] == answered[ref]:  # the live version is the shadow's (latest moved to it)
                self.release([item])
                continue
            shadows.append(Resolved(SHADOW_REF + ref, item[1], item[2]))
        tags = {ref: tag for ref, tag in choice.tags.items() if ref in answered}
        return Route(resolved, shadows, tags, unit, timing.get(ADAPTER_LOAD, 0.0))

    def settle(self, tenant: str, route: Route, out: dict, parts: list, texts: Sequence[str], source: str, *,
               ms: float = 0.0, debug: bool = False) -> Scored:
        """Take the shadows' entries out of ``out`` (under each live entry's ``"shadow"`` when
        ``debug``), add the choosers' tags to their refs' entries and the route's adapter reading to
        ``out["timing_ms"]`` (``"adapter_load"``, first; 0 when none was read), and return the
        observers' view."""
        shadows: dict[str, list[dict]] = {}
        if route.shadows:
            for s in route.shadows:
                live = s.ref[len(SHADOW_REF):]
                shadows[live] = [r["classifications"].pop(s.ref) for r in out["results"]]
                if debug:
                    for r, entry in zip(out["results"], shadows[live]):
                        r["classifications"][live]["shadow"] = entry
            hidden = {s.ref for s in route.shadows}
            parts = [(batch, [it for it in items if it[0] not in hidden]) for batch, items in parts]
            parts = [p for p in parts if p[1]]
        for ref, tag in route.tags.items():
            for r in out["results"]:
                r["classifications"][ref].update(tag)
        out["timing_ms"] = {ADAPTER_LOAD: round(route.adapter_load_ms, 3), **out["timing_ms"]}
        return Scored(tenant, list(route.resolved), out, source, parts, texts, route, shadows, ms)
