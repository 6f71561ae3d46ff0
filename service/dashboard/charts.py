"""Charts for the dashboard: server-rendered SVG from matplotlib, inlined in the page.

Why matplotlib on the server rather than a JavaScript chart library in the browser:
- **Nothing to serve or pin on the client.** The pages carry no script at all (the Content
  Security Policy says ``script-src 'none'``), so the dashboard works offline, behind any proxy,
  with JavaScript off, and the test browser sees exactly the SVG the server drew. A JS library
  would have to be vendored into the repository or pulled from a Python package that wraps it;
  matplotlib is one well-kept PyPI dependency with no build step.
- **Cheap for many classifiers.** Charts are drawn only for what a page shows (the tenant's cache,
  one classifier's windows, one experiment), never one per row of a 1,000-classifier listing; an
  SVG for unchanged figures is reused from a small LRU, so a reload redraws nothing.
- **Readable without colour.** Every series has its own hatch, marker or line style as well as a
  colour (Okabe-Ito, safe for colour-blind readers), thresholds are labelled lines in the legend,
  and every chart has a table of the same numbers beside it on the page. Each ``<svg>`` carries
  ``role="img"`` and an ``aria-label`` that says what it shows.

Only matplotlib's object API is used (``Figure`` + the SVG backend; never ``pyplot``, whose global
state is not thread-safe); drawing holds a lock because ``rcParams`` are process-wide.
Each function returns an SVG string (``<svg ...>...</svg>``, no XML prolog) sized by CSS.
"""

from __future__ import annotations

import collections
import html
import io
import math
import re
import threading
from typing import Any, Sequence

# Okabe & Ito (2008), "Color Universal Design": distinguishable by colour-blind readers
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"]
HATCHES = ["", "//", "..", "xx", "\\\\", "oo", "--", "++"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
LINESTYLES = ["-", "--", ":", "-."]
MAX_WINDOWS = 48  # a chart shows the newest 48 monitor windows; the table lists them all

_lock = threading.Lock()
_cache: "collections.OrderedDict[str, str]" = collections.OrderedDict()
_CACHE_SIZE = 256


def _rc() -> dict[str, Any]:
    return {"svg.fonttype": "none", "font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
            "svg.hashsalt": None}


# Margins are set by hand (figure fractions), not by matplotlib's constrained layout: that
# layout redraws the figure to measure it and made a chart 3-5x slower to render.
ROOM = {"left": 0.11, "right": 0.97, "bottom": 0.2, "top": 0.95}
LEGEND_RIGHT = dict(ROOM, right=0.74)  # a legend beside the axes, never over a bar or point


def _render(key: str, label: str, draw, size: tuple[float, float], margins: dict[str, float] = ROOM) -> str:
    """``draw(fig)`` on a new figure of ``size`` inches -> inline SVG, memoised on ``key``."""
    full = f"{label}|{size}|{key}"
    with _lock:
        hit = _cache.get(full)
        if hit is not None:
            _cache.move_to_end(full)
            return hit
        import matplotlib
        from matplotlib.backends.backend_svg import FigureCanvasSVG
        from matplotlib.figure import Figure

        with matplotlib.rc_context(_rc()):
            fig = Figure(figsize=size)
            FigureCanvasSVG(fig)
            fig.subplots_adjust(**margins)
            draw(fig)
            buf = io.StringIO()
            fig.savefig(buf, format="svg")
        svg = buf.getvalue()
        svg = svg[svg.index("<svg"):]
        svg = re.sub(r"<metadata>.*?</metadata>", "", svg, count=1, flags=re.S)
        svg = re.sub(r'^<svg ([^>]*?)width="[^"]*" height="[^"]*"',
                     lambda m: f'<svg {m.group(1)}role="img" aria-label="{html.escape(label, quote=True)}" '
                               'class="chart"', svg, count=1)
        _cache[full] = svg
        if len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
        return svg


def _computed_avoided_bars(fig, rows: Sequence[tuple[str, int, int]], computed: str, avoided: str) -> None:
    """Horizontal stacked bars, one per ``(name, computed, avoided)`` row, hatched as well as coloured."""
    ax = fig.subplots()
    ys = range(len(rows))
    ax.barh(ys, [c for _, c, _ in rows], color=PALETTE[5], hatch="//", edgecolor="#222222", linewidth=0.6,
            label=computed)
    ax.barh(ys, [a for _, _, a in rows], left=[c for _, c, _ in rows], color=PALETTE[2], hatch="..",
            edgecolor="#222222", linewidth=0.6, label=avoided)
    ax.set_yticks(list(ys), [n for n, _, _ in rows])
    ax.invert_yaxis()
    ax.set_xlabel("embeddings")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)


def _nan(x: float | None) -> float:
    return math.nan if x is None else float(x)


def cache_windows(stats: dict[str, Any], tiers: Sequence[str]) -> str:
    """Grouped bars: the share of lookups each tier answered, for /stats' 1m, 5m, 1h windows and
    since start (``stats`` as ``GET /stats`` answers it)."""
    spans = [("last 1 min", stats["windows"]["1m"]), ("last 5 min", stats["windows"]["5m"]),
             ("last hour", stats["windows"]["1h"]), ("since start", stats["since_start"])]
    shares = [[(w["hits"].get(t, 0) / w["lookups"]) if w["lookups"] else 0.0 for t in tiers] for _, w in spans]
    key = repr((tuple(tiers), shares))
    label = "Cache hit rate per tier: " + "; ".join(
        f"{name}: " + ", ".join(f"{t} {s:.1%}" for t, s in zip(tiers, row)) for (name, _), row in zip(spans, shares))

    def draw(fig):
        ax = fig.subplots()
        width = 0.8 / max(1, len(tiers))
        for i, tier in enumerate(tiers):
            xs = [j + (i - (len(tiers) - 1) / 2) * width for j in range(len(spans))]
            ax.bar(xs, [row[i] * 100 for row in shares], width, label=tier, color=PALETTE[i % 8],
                   hatch=HATCHES[i % 8], edgecolor="#222222", linewidth=0.6)
        ax.set_xticks(range(len(spans)), [s for s, _ in spans])
        ax.set_ylabel("hit rate (% of lookups)")
        ax.set_ylim(0, 100)
        ax.legend(title="tier", loc="upper left", frameon=False)

    return _render(key, label, draw, (6.0, 2.6))


def cache_minutes(series: list[dict[str, Any]], tiers: Sequence[str]) -> str:
    """Lines: per minute over the last hour, the share of lookups each tier answered (gaps where a
    minute had no lookups), and the lookups per minute as bars on a second axis."""
    key = repr([(r["minute"], r["lookups"], tuple(r["hits"].get(t, 0) for t in tiers)) for r in series])
    busy = [r for r in series if r["lookups"]]
    label = (f"Cache hit rate per tier per minute over the last {len(series)} minutes; "
             f"{len(busy)} minutes had lookups")

    def draw(fig):
        ax = fig.subplots()
        xs = [(r["minute"] - series[-1]["minute"]) / 60 for r in series]
        ax2 = ax.twinx()
        ax2.fill_between(xs, [r["lookups"] for r in series], step="mid", color="#dddddd", edgecolor="#777777",
                         linewidth=0.6, label="lookups")
        ax2.set_ylabel("lookups per minute")
        ax.set_zorder(ax2.get_zorder() + 1)
        ax.patch.set_visible(False)
        for i, tier in enumerate(tiers):
            ys = [(r["hits"].get(tier, 0) / r["lookups"] * 100) if r["lookups"] else math.nan for r in series]
            ax.plot(xs, ys, linestyle=LINESTYLES[i % 4], marker=MARKERS[i % 8], markersize=4, color=PALETTE[i % 8],
                    label=f"{tier} hit rate")
        ax.set_ylim(0, 100)
        ax.set_xlabel("minutes before now")
        ax.set_ylabel("hit rate (%)")
        handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.12, 1.0), frameon=False)

    return _render(key, label, draw, (7.0, 2.6), dict(ROOM, right=0.66))


def computed_avoided(stats: dict[str, Any]) -> str:
    """Stacked horizontal bars per /stats window: embeddings the backbone computed vs. avoided."""
    spans = [("last 1 min", stats["windows"]["1m"]), ("last 5 min", stats["windows"]["5m"]),
             ("last hour", stats["windows"]["1h"]), ("since start", stats["since_start"])]
    rows = [(n, w["computed"], w["embeddings_avoided"]) for n, w in spans]
    label = "Embeddings computed vs avoided: " + "; ".join(f"{n}: {c} computed, {a} avoided" for n, c, a in rows)

    def draw(fig):
        _computed_avoided_bars(fig, rows, "computed (backbone forward)", "avoided (cache or repeat)")

    return _render(repr(rows), label, draw, (7.0, 2.2), dict(LEGEND_RIGHT, left=0.14))


def _recent(windows: list[dict]) -> tuple[list[dict], int]:
    shown = windows[-MAX_WINDOWS:]
    return shown, len(windows) - len(shown)


def window_traffic(windows: list[dict]) -> str:
    """Bars: texts per closed monitor window; windows flagged ``drift`` are hatched and marked."""
    shown, skip = _recent(windows)
    xs = [skip + i + 1 for i in range(len(shown))]
    key = repr([(w["texts"], w["drift"]) for w in shown])
    label = "Texts per monitor window: " + ", ".join(
        f"window {x}: {w['texts']}{' (drift)' if w['drift'] else ''}" for x, w in zip(xs, shown))

    def draw(fig):
        ax = fig.subplots()
        for flag, hatch, colour, name in ((False, "", PALETTE[0], "no drift"), (True, "xx", PALETTE[5], "drift")):
            sel = [(x, w["texts"]) for x, w in zip(xs, shown) if bool(w["drift"]) == flag]
            if sel:
                ax.bar([x for x, _ in sel], [t for _, t in sel], 0.7, color=colour, hatch=hatch,
                       edgecolor="#222222", linewidth=0.6, label=name)
        ax.set_xlabel("window")
        ax.set_ylabel("texts")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)

    return _render(key, label, draw, (6.0, 2.2), LEGEND_RIGHT)


def window_labels(windows: list[dict]) -> str:
    """Stacked bars: each window's predicted-label distribution (share of its texts), one hatch per label."""
    shown, skip = _recent(windows)
    labels = sorted({k for w in shown for k in (w.get("predicted") or {})})
    xs = [skip + i + 1 for i in range(len(shown))]
    key = repr([sorted((w.get("predicted") or {}).items()) for w in shown])
    label = "Predicted label distribution per window: " + "; ".join(
        f"window {x}: " + ", ".join(f"{k} {v}" for k, v in sorted((w.get('predicted') or {}).items()))
        for x, w in zip(xs, shown))

    def draw(fig):
        ax = fig.subplots()
        bottom = [0.0] * len(shown)
        for i, lab in enumerate(labels):
            share = []
            for w in shown:
                counts = w.get("predicted") or {}
                n = sum(counts.values())
                share.append(100 * counts.get(lab, 0) / n if n else 0.0)
            ax.bar(xs, share, 0.7, bottom=bottom, label=lab, color=PALETTE[i % 8], hatch=HATCHES[i % 8],
                   edgecolor="#222222", linewidth=0.6)
            bottom = [b + s for b, s in zip(bottom, share)]
        ax.set_ylim(0, 100)
        ax.set_xlabel("window")
        ax.set_ylabel("% of texts")
        ax.legend(title="predicted", loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)

    return _render(key, label, draw, (6.0, 2.4), LEGEND_RIGHT)


def window_drift(windows: list[dict], settings: dict[str, Any]) -> str:
    """Two panels per window: label PSI with the ``psi`` threshold (and 0.25, a major shift), and the
    domain classifier's AUC with the ``domain_auc`` threshold. Points above a threshold are filled."""
    shown, skip = _recent(windows)
    xs = [skip + i + 1 for i in range(len(shown))]
    psi, auc = [_nan(w.get("label_psi")) for w in shown], [_nan(w.get("domain_auc")) for w in shown]
    key = repr((psi, auc, settings.get("psi"), settings.get("domain_auc")))
    label = (f"Drift signals per window; thresholds: label PSI {settings.get('psi')}, domain AUC "
             f"{settings.get('domain_auc')}. " + "; ".join(
                 f"window {x}: PSI {_fmt(w.get('label_psi'))}, AUC {_fmt(w.get('domain_auc'))}"
                 for x, w in zip(xs, shown)))

    def panel(ax, ys, limit, name, extra=None):
        ax.plot(xs, ys, color=PALETTE[0], linestyle="-", marker="o", markerfacecolor="white", label=name)
        over = [(x, y) for x, y in zip(xs, ys) if not math.isnan(y) and y > limit]
        if over:
            ax.plot([x for x, _ in over], [y for _, y in over], linestyle="none", marker="X", markersize=8,
                    color=PALETTE[5], label="over threshold")
        ax.axhline(limit, color="#222222", linestyle="--", linewidth=1, label=f"threshold {limit:g}")
        if extra is not None:
            ax.axhline(extra, color="#222222", linestyle=":", linewidth=1, label=f"major shift {extra:g}")
        ax.set_ylabel(name)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=8)

    def draw(fig):
        a, b = fig.subplots(2, 1, sharex=True)
        panel(a, psi, float(settings.get("psi") or 0.1), "label PSI", 0.25)
        panel(b, auc, float(settings.get("domain_auc") or 0.55), "domain AUC")
        b.set_xlabel("window")

    return _render(key, label, draw, (6.0, 3.6), dict(LEGEND_RIGHT, bottom=0.13, hspace=0.15))


def window_canary(windows: list[dict], settings: dict[str, Any], holdout: float | None) -> str:
    """Canary accuracy per window with the two floors drawn: ``accuracy_slo`` (when set) and the
    version's holdout accuracy minus ``accuracy_drop``. Windows flagged ``accuracy_drop`` are marked."""
    shown, skip = _recent(windows)
    xs = [skip + i + 1 for i in range(len(shown))]
    acc = [_nan(w.get("canary_accuracy")) for w in shown]
    slo, drop = settings.get("accuracy_slo"), settings.get("accuracy_drop")
    floor = None if holdout is None or drop is None else holdout - drop
    key = repr((acc, [bool(w.get("accuracy_drop")) for w in shown], slo, floor))
    label = (f"Canary accuracy per window; SLO {slo if slo is not None else 'not set'}, holdout floor "
             f"{_fmt(floor)}. " + "; ".join(f"window {x}: {_fmt(w.get('canary_accuracy'))}" for x, w in zip(xs, shown)))

    def draw(fig):
        ax = fig.subplots()
        ax.plot(xs, acc, color=PALETTE[2], linestyle="-", marker="s", markerfacecolor="white",
                label="canary accuracy")
        bad = [(x, y) for x, y, w in zip(xs, acc, shown) if w.get("accuracy_drop")]
        if bad:
            ax.plot([x for x, _ in bad], [y for _, y in bad], linestyle="none", marker="X", markersize=8,
                    color=PALETTE[5], label="accuracy drop")
        if slo is not None:
            ax.axhline(slo, color="#222222", linestyle="--", linewidth=1, label=f"SLO {slo:g}")
        if floor is not None:
            ax.axhline(floor, color="#222222", linestyle=":", linewidth=1,
                       label=f"floor {floor:.3f}\n(holdout {holdout:.3f} − {drop:g})")
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("window")
        ax.set_ylabel("accuracy")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=8)

    return _render(key, label, draw, (6.4, 2.4), dict(LEGEND_RIGHT, right=0.66))


def experiment_lift(report: dict[str, Any]) -> str:
    """The lift (treatment − control mean) with its 95 % CI as an error bar, against zero."""
    lift, ci = report.get("lift"), report.get("ci95")
    key = repr((lift, ci, report.get("recommendation")))
    label = (f"Lift {_fmt(lift)} with 95% confidence interval "
             f"{_fmt(ci[0]) if ci else 'n/a'} to {_fmt(ci[1]) if ci else 'n/a'}; "
             f"recommendation: {report.get('recommendation')}")

    def draw(fig):
        ax = fig.subplots()
        ax.axvline(0, color="#222222", linestyle="--", linewidth=1, label="no difference")
        if lift is not None and ci and None not in ci:
            ax.errorbar([lift], [0], xerr=[[lift - ci[0]], [ci[1] - lift]], fmt="D", color=PALETTE[0],
                        capsize=6, markersize=7, label="lift, 95 % CI")
            span = max(abs(ci[0]), abs(ci[1]), 1e-9) * 1.3
            ax.set_xlim(-span, span)
        else:
            ax.text(0.5, 0.5, "not enough outcomes yet", transform=ax.transAxes, ha="center", va="center")
        ax.set_yticks([])
        ax.set_xlabel("treatment − control (mean outcome per unit)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=8)

    return _render(key, label, draw, (6.0, 1.6), dict(LEGEND_RIGHT, left=0.04, bottom=0.3))


def experiment_looks(looks: list[dict[str, Any]]) -> str:
    """The lift as it accrued: one point per look (an accepted outcomes post, numbered from 1), its
    95 % CI as a hatched band, and zero as a dashed line. Empty string with fewer
    than two looks (the single-look chart says it all)."""
    pts = [lk for lk in looks if lk.get("lift") is not None]
    if len(pts) < 2:
        return ""
    key = repr([(lk["n_control"], lk["n_treatment"], lk["lift"], lk.get("ci95")) for lk in pts])
    last = pts[-1]
    label = (f"Lift over {len(pts)} looks, from {_fmt(pts[0]['lift'])} at the first to {_fmt(last['lift'])} "
             "at the last, with its 95% confidence interval")

    def draw(fig):
        ax = fig.subplots()
        x = list(range(1, len(pts) + 1))
        lo = [_nan((lk.get("ci95") or [None, None])[0]) for lk in pts]
        hi = [_nan((lk.get("ci95") or [None, None])[1]) for lk in pts]
        ax.fill_between(x, lo, hi, facecolor="none", edgecolor=PALETTE[0], hatch="//", linewidth=0,
                        label="95 % CI")
        ax.plot(x, [lk["lift"] for lk in pts], marker="D", markersize=4, color=PALETTE[0], label="lift")
        ax.axhline(0, color="#222222", linestyle="--", linewidth=1, label="no difference")
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("look (accepted outcomes post)")
        ax.set_ylabel("treatment − control")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=8)

    return _render(key, label, draw, (6.4, 2.4), dict(LEGEND_RIGHT, left=0.13))


def fleet_tenants(rows: list[tuple[str, int, int]]) -> str:
    """Stacked horizontal bars for up to 20 tenants: (tenant, computed, avoided) embeddings."""
    rows = rows[:20]
    label = "Embeddings computed vs avoided per tenant: " + "; ".join(f"{t}: {c} computed, {a} avoided"
                                                                       for t, c, a in rows)

    def draw(fig):
        _computed_avoided_bars(fig, rows, "computed", "avoided")

    height = 0.9 + 0.3 * max(1, len(rows))
    return _render(repr(rows), label, draw, (7.0, height), dict(LEGEND_RIGHT, left=0.16, bottom=0.55 / height,
                                                                    top=1 - 0.1 / height))


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
