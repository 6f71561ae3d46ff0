"""What the browser tests do on a page: sign in, read the figures shown, check them, run axe, take a screenshot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LOGIN_TIMEOUT_MS = 60_000


def login(context, url: str, key: str):
    """A new page of ``context`` signed in with ``key`` through the login form; returns the page."""
    page = context.new_page()
    page.set_default_timeout(LOGIN_TIMEOUT_MS)
    page.goto(f"{url}/dashboard")
    assert page.url.endswith("/dashboard/login"), page.url
    page.fill("#key", key)
    page.click("button[type=submit]")
    page.wait_for_load_state("load")
    assert key not in page.url
    assert not page.url.endswith("/dashboard/login"), page.text_content("main")
    return page


def figures(page) -> list[tuple[list, Any, str]]:
    """Every figure the page shows: (path into the JSON it repeats, exact value, text shown)."""
    raw = page.eval_on_selector_all("[data-figure]", "els => els.map(e => [e.dataset.figure, e.dataset.value, "
                                                     "e.textContent.trim()])")
    return [(json.loads(p), json.loads(v), t) for p, v, t in raw]


def resolve(doc: Any, path: list) -> Any:
    for part in path:
        doc = doc[part]
    return doc


def shown_as(value: Any, text: str) -> bool:
    """The text is one of the dashboard's ways of writing this value."""
    if value is None:
        return text == "n/a"
    if isinstance(value, bool):
        return text == ("yes" if value else "no")
    if isinstance(value, int):
        return text in (f"{value:,}", str(value))
    if isinstance(value, float):
        return text in (f"{value * 100:.1f} %", f"{value:.3f}", str(value))
    return text == str(value)


def check_figures(page, docs: dict[str, Any]) -> int:
    """Each figure whose path starts with a key of ``docs`` equals that document at that path, value
    and text; returns how many were checked. ``docs`` values may be a list of readings (before and
    after the page was read): the figure must equal one of them."""
    n = 0
    for path, value, text in figures(page):
        assert path[0] in docs, f"figure {path} has no document to compare with"
        readings = docs[path[0]] if isinstance(docs[path[0]], list) else [docs[path[0]]]
        expected = [resolve(d, path[1:]) for d in readings]
        assert value in expected, f"{path}: shown {value!r}, the endpoint says {expected!r}"
        assert shown_as(value, text), f"{path}: value {value!r} written as {text!r}"
        n += 1
    return n


def serious_violations(page, report: Path | None = None) -> list[dict]:
    """axe-core (bundled by the axe-playwright-python package) on the page: violations whose impact is
    serious or critical, as ``{"id", "impact", "help", "nodes"}``. Every violation, whatever its
    impact, is written to ``report`` (JSON) when given."""
    from axe_playwright_python.sync_playwright import Axe

    result = Axe().run(page)
    assert len(result.response["passes"]) >= 10, "axe checked almost nothing: is the page empty?"
    found = [{"id": v["id"], "impact": v["impact"], "help": v["help"],
              "nodes": [n.get("target") for n in v["nodes"]][:5]} for v in result.response["violations"]]
    if report is not None:
        report.write_text(json.dumps({"url": page.url, "violations": found,
                                      "passes": len(result.response["passes"])}, indent=1))
    return [v for v in found if v["impact"] in ("serious", "critical")]


def shot(page, artefacts: Path, name: str) -> Path:
    path = artefacts / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
