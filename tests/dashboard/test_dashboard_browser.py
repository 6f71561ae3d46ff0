"""The dashboard in a real browser (Debian's Chromium, Playwright) against a real server after real traffic.

Each page's figures are read from the page and compared with the JSON endpoint they repeat, read
just before and just after (the traffic has stopped; a figure must equal one of the two readings,
so a minute boundary passing between them cannot fail the test). Every page is checked with axe-core
(no serious or critical finding) and saved as a screenshot.
"""

from __future__ import annotations

import re
import time

import pytest

from browsing import check_figures, figures, login, serious_violations, shot
from dashboard_world import ACME, ADMIN, BULK, GLOBEX, GLOBEX_CLASSIFIER, GLOBEX_TEXT


@pytest.fixture(scope="module")
def acme_context(browser, world):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = login(context, world.url, ACME)
    assert page.url.endswith("/dashboard/t/acme"), page.url
    page.close()
    yield context
    context.close()


def _open(context, url: str):
    page = context.new_page()
    page.set_default_timeout(60_000)
    response = page.goto(url)
    page.wait_for_load_state("load")
    return page, response


def _accessible(page, name: str, artefacts) -> None:
    shot(page, artefacts, name)
    bad = serious_violations(page, artefacts / f"axe-{name}.json")
    assert not bad, f"{name}: axe found serious/critical violations: {bad}"


def test_the_session_cookie_is_signed_http_only_strict_and_expiring(acme_context, world):
    cookies = {c["name"]: c for c in acme_context.cookies(f"{world.url}/dashboard/t/acme")}
    session = cookies["hf_dash"]
    assert session["httpOnly"] and session["sameSite"] == "Strict" and session["path"] == "/dashboard"
    assert 7 * 3600 < session["expires"] - time.time() <= 8 * 3600
    assert ACME not in session["value"]
    assert "hf_dash_csrf" not in cookies  # spent at login


def test_tenant_page_shows_what_stats_says(acme_context, world, artefacts):
    before = world.acme.get("/stats").json()
    page, response = _open(acme_context, f"{world.url}/dashboard/t/acme")
    after = world.acme.get("/stats").json()
    assert response.status == 200
    assert response.headers["content-security-policy"].startswith("default-src 'none'")
    n = check_figures(page, {"stats": [before, after]})
    assert n >= 40, n  # every window x every column, the held bytes, the listed classifiers
    # embeddings avoided, backbone forwards saved: shown and consistent
    avoided = after["since_start"]["embeddings_avoided"]
    assert avoided > 0
    saved = page.text_content("[data-derived=forwards_saved]").strip()
    assert saved == f"{-(-avoided // world.server.service.settings.batch_size):,}"
    # three charts, each an SVG image with a description, all served by headfleet (no other origin)
    labels = page.eval_on_selector_all("svg.chart", "els => els.map(e => e.getAttribute('role') + '|' + "
                                                    "e.getAttribute('aria-label'))")
    assert len(labels) == 3 and all(lab.startswith("img|") for lab in labels)
    assert "since start: memory" in labels[0]
    _accessible(page, "tenant-acme", artefacts)
    page.close()


def test_no_asset_comes_from_elsewhere(acme_context, world):
    seen = []
    page = acme_context.new_page()
    page.on("request", lambda r: seen.append(r.url))
    page.goto(f"{world.url}/dashboard/t/acme/classifiers/spam")
    page.wait_for_load_state("load")
    assert seen and all(u.startswith(world.url) for u in seen), seen
    assert any(u.endswith("/dashboard/static/dashboard.css") for u in seen)
    page.close()


def test_classifier_page_shows_monitor_shadow_and_cache(acme_context, world, artefacts):
    c = world.acme
    readings = [{"monitor": c.get("/classifiers/spam/monitor").json(), "shadow": c.get("/classifiers/spam/shadow").json(),
                 "stats": c.get("/stats").json()}]
    page, response = _open(acme_context, f"{world.url}/dashboard/t/acme/classifiers/spam")
    readings.append({"monitor": c.get("/classifiers/spam/monitor").json(),
                     "shadow": c.get("/classifiers/spam/shadow").json(), "stats": c.get("/stats").json()})
    assert response.status == 200
    n = check_figures(page, {k: [r[k] for r in readings] for k in ("monitor", "shadow", "stats")})
    monitor = readings[-1]["monitor"]
    assert len(monitor["windows"]) >= 4 and n >= 10 * len(monitor["windows"])
    assert any(w["drift"] for w in monitor["windows"]) and any(w["accuracy_drop"] for w in monitor["windows"])
    # every window is a row, its flags written out (not colour alone)
    rows = page.locator("#windows tbody tr")
    assert rows.count() == len(monitor["windows"])
    assert "drift" in rows.nth(0).text_content()
    # the thresholds are drawn in: named in the charts' descriptions and in their legends
    drift_svg = page.locator("svg.chart").nth(2)
    assert f"label PSI {monitor['settings']['psi']}" in drift_svg.get_attribute("aria-label")
    assert "threshold 0.1" in drift_svg.text_content() and "threshold 0.55" in drift_svg.text_content()
    canary_svg = page.locator("svg.chart").nth(3)
    assert "SLO 0.95" in canary_svg.text_content()
    # alerts and the retrain the windows triggered, with its candidate linked
    kinds = {a["kind"] for a in monitor["alerts"]}
    assert {"drift", "accuracy_drop"} <= kinds
    assert page.locator("#alerts tbody tr").count() == len(monitor["alerts"])
    assert monitor["retrain"]["triggered"]
    assert "retrain triggered" in page.text_content("#monitor-h + p ~ p") or \
        "retrain triggered" in page.text_content("main")
    # versions, aliases and the candidate link to their own pages
    aliases = c.get("/classifiers/spam").json()["aliases"]
    hrefs = page.eval_on_selector_all("ul.versions a", "els => els.map(e => e.getAttribute('href'))")
    assert hrefs == [f"/dashboard/t/acme/classifiers/spam@{v}" for v in c.get("/classifiers/spam").json()["versions"]]
    candidate = page.locator(f"a[href='/dashboard/t/acme/classifiers/spam@{aliases['candidate']}']").first
    assert candidate.count() == 1
    candidate.click()
    page.wait_for_load_state("load")
    assert page.url.endswith(f"/classifiers/spam@{aliases['candidate']}")
    assert f"version {aliases['candidate']}" in page.text_content("h1")
    page.go_back()
    page.wait_for_load_state("load")
    # the shadow's flip matrix and the experiment's lift
    assert page.locator("#flips tbody tr").count() == len(readings[-1]["shadow"]["flips"])
    assert world.exp in page.inner_html("main")
    _accessible(page, "classifier-spam", artefacts)
    page.close()


def test_experiment_page_shows_what_the_experiment_says(acme_context, world, artefacts):
    before = world.acme.get(f"/experiments/{world.exp}").json()
    page, response = _open(acme_context, f"{world.url}/dashboard/t/acme/experiments/{world.exp}")
    after = world.acme.get(f"/experiments/{world.exp}").json()
    assert response.status == 200
    n = check_figures(page, {"experiment": [before, after]})
    assert n >= 12, n
    assert after["recommendation"] in page.text_content("h2#rec-h")
    chart = page.locator("svg.chart").first.get_attribute("aria-label")
    assert f"recommendation: {after['recommendation']}" in chart and f"{after['ci95'][0]:.3f}" in chart
    # the lift as it accrued: one table row and one chart point per look
    assert len(after["looks"]) == 2 and page.locator("#looks tbody tr").count() == 2
    assert "Lift over 2 looks" in page.locator("#looks-h + figure svg.chart").get_attribute("aria-label")
    _accessible(page, "experiment", artefacts)
    page.close()


def test_the_listing_is_paged_and_searchable(acme_context, world):
    page, _ = _open(acme_context, f"{world.url}/dashboard/t/acme")
    total = BULK + 1
    assert page.locator("#classifiers tbody tr").count() == 50
    assert f"of {total:,}" in page.text_content("#listing-count")
    page.click("a[rel=next]")
    page.wait_for_load_state("load")
    assert "page=2" in page.url and page.locator("#classifiers tbody tr").first.text_content().strip().startswith(
        "bulk-0050")
    page.click("a[rel=next]")
    page.wait_for_load_state("load")
    assert page.locator("#classifiers tbody tr").count() == total - 100
    assert page.locator("a[rel=next]").count() == 0
    page.fill("#q", "bulk-011")
    page.press("#q", "Enter")
    page.wait_for_load_state("load")
    names = page.eval_on_selector_all("#classifiers tbody th a", "els => els.map(e => e.textContent)")
    assert names == [f"bulk-{i:04d}" for i in range(110, 120)]
    page.fill("#q", "no-such-name")
    page.press("#q", "Enter")
    page.wait_for_load_state("load")
    assert "Nothing matches" in page.text_content("#listing-count")
    page.close()


def test_another_tenants_data_never_appears(acme_context, world, browser, artefacts):
    for path in ("/dashboard/t/acme", "/dashboard/t/acme/classifiers/spam", f"/dashboard/t/acme/experiments/{world.exp}",
                 "/dashboard/t/acme?page=3"):
        page, _ = _open(acme_context, world.url + path)
        html = page.content().lower()
        for secret in ("globex", GLOBEX_CLASSIFIER, GLOBEX_TEXT.lower(), world.globex_exp):
            assert secret.lower() not in html, (path, secret)
        page.close()
    for path in ("/dashboard/t/globex", f"/dashboard/t/globex/classifiers/{GLOBEX_CLASSIFIER}",
                 f"/dashboard/t/acme/experiments/{world.globex_exp}", f"/dashboard/t/acme/classifiers/{GLOBEX_CLASSIFIER}",
                 "/dashboard/t/nobody"):
        page, response = _open(acme_context, world.url + path)
        assert response.status == 404, path  # the same answer as something that does not exist
        assert "not_found" in page.text_content("main")
        assert GLOBEX_TEXT.lower() not in page.content().lower()
        page.close()
    page, _ = _open(acme_context, f"{world.url}/dashboard/t/acme?q=glob")  # a search finds nothing of theirs
    assert "Nothing matches" in page.text_content("#listing-count") and page.locator("#classifiers").count() == 0
    page.close()
    page, response = _open(acme_context, f"{world.url}/dashboard/fleet")
    assert response.status == 403
    shot(page, artefacts, "fleet-refused-for-tenant")
    page.close()
    # and globex, signed in with its own key, sees its classifier but nothing of acme's
    context = browser.new_context()
    page = login(context, world.url, GLOBEX)
    assert page.url.endswith("/dashboard/t/globex")
    assert GLOBEX_CLASSIFIER in page.text_content("#classifiers")
    assert "spam" not in page.text_content("#classifiers") and "bulk-" not in page.content()
    context.close()


def test_the_admin_sees_every_tenant_and_the_fleet(browser, world, artefacts):
    assert world.admin.post("/admin/tenants/initech/keys").status_code == 201  # a tenant with a key, no traffic
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    before = world.admin.get("/admin/stats").json()
    page = login(context, world.url, ADMIN)
    after = world.admin.get("/admin/stats").json()
    assert page.url.endswith("/dashboard/fleet"), page.url
    listed = page.eval_on_selector_all("#tenants tbody th a", "els => els.map(e => e.textContent)")
    assert listed == ["acme", "globex", "initech"]
    totals = []
    for doc in (before, after):
        t = {"lookups": 0, "computed": 0, "embeddings_avoided": 0, "misses": 0}
        for s in doc["tenants"].values():
            for k in t:
                t[k] += s[k]
        totals.append(t)
    docs = {"fleet": [{"stats": d["tenants"], "total": t} for d, t in zip((before, after), totals)]}
    checked = 0
    for path, value, _ in figures(page):
        if path[:2] == ["fleet", "total"] and path[2] in totals[0]:
            assert value in [t[path[2]] for t in totals], path
            checked += 1
        elif path[:2] == ["fleet", "stats"]:
            assert value in [d["stats"][path[2]][path[3]] for d in docs["fleet"]], path
            checked += 1
    assert checked >= 11  # 3 totals + 4 figures for each of the two tenants with traffic
    _accessible(page, "fleet", artefacts)
    page.click("#tenants a:text-is('globex')")
    page.wait_for_load_state("load")
    assert page.url.endswith("/dashboard/t/globex") and GLOBEX_CLASSIFIER in page.text_content("#classifiers")
    page.goto(f"{world.url}/dashboard/t/acme/classifiers/spam")
    assert page.locator("#windows tbody tr").count() >= 4
    context.close()


def test_logout_and_bad_cookies_go_back_to_login(browser, world, artefacts):
    from headfleet.service.dashboard.session import Signer, load_secret

    context = browser.new_context()
    page = login(context, world.url, ACME)
    page.click("form.logout button")
    page.wait_for_load_state("load")
    assert page.url.endswith("/dashboard/login")
    assert "hf_dash" not in {c["name"] for c in context.cookies(f"{world.url}/dashboard/t/acme")}
    page.goto(f"{world.url}/dashboard/t/acme")
    assert page.url.endswith("/dashboard/login")
    secret = load_secret(world.data)
    key_id = world.admin.get("/admin/tenants").json()["tenants"]["acme"][0]["key_id"]
    good = Signer(secret).issue("acme", key_id)
    head, payload, sig = good.split(".")
    forged_for_globex = Signer(secret).issue("globex", key_id).split(".")[1]
    expired = Signer(secret, clock=lambda: time.time() - 9 * 3600).issue("acme", key_id)
    for value, where in ((good, "/dashboard/t/acme"), (f"{head}.{forged_for_globex}.{sig}", "/dashboard/login"),
                         (expired, "/dashboard/login"), ("garbage", "/dashboard/login")):
        context.clear_cookies()
        context.add_cookies([{"name": "hf_dash", "value": value, "url": f"{world.url}/dashboard"}])
        page.goto(f"{world.url}/dashboard/t/acme")
        assert page.url.endswith(where), (value, page.url)
    # a revoked key ends its sessions
    created = world.admin.post("/admin/tenants/acme/keys").json()
    context.clear_cookies()
    page = login(context, world.url, created["key"])
    assert page.url.endswith("/dashboard/t/acme")
    assert world.admin.delete(f"/admin/keys/{created['key_id']}").status_code == 200
    page.goto(f"{world.url}/dashboard/t/acme")
    assert page.url.endswith("/dashboard/login")
    context.close()


def test_a_wrong_key_shows_the_login_form_again(browser, world, artefacts):
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{world.url}/dashboard/login")
    _accessible(page, "login", artefacts)
    page.fill("#key", "not-a-key")
    with page.expect_response(re.compile(r".*/dashboard/login$")) as info:
        page.click("button[type=submit]")
    assert info.value.status == 401
    page.wait_for_load_state("load")
    assert "unknown API key" in page.text_content("[role=alert]") and "unauthorized" in page.text_content("[role=alert]")
    assert "not-a-key" not in page.content()
    page.fill("#key", GLOBEX)  # the re-rendered form carries a fresh CSRF token that works
    page.click("button[type=submit]")
    page.wait_for_load_state("load")
    assert page.url.endswith("/dashboard/t/globex")
    context.close()
