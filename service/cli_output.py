"""What the ``headfleet`` command prints: progress bars, tables, reports, retrain lines."""

from __future__ import annotations

import contextlib
import json
import sys

PROGRESS_THRESHOLD = 300  # texts; below this a progress bar is noise


@contextlib.contextmanager
def progress_bar(total: int, desc: str):
    """A tqdm bar on stderr for long work, or a no-op callback for short work."""
    if total <= PROGRESS_THRESHOLD:
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="text", file=sys.stderr, dynamic_ncols=True) as bar:
        yield bar.update


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def format_report(report: dict) -> str:
    lines = [f"examples: {report['n_examples']}   per class: "
             + ", ".join(f"{k}={v}" for k, v in report["per_class"].items()),
             f"duplicates: {report['duplicates']}   conflicting labels: {report['conflicting']}   "
             f"[UNK] share: {report.get('unk_share') or 0:.2%}   truncated: {report.get('truncated_share') or 0:.2%}"]
    lines += [f"warning: {w}" for w in report.get("warnings", [])]
    return "\n".join(lines)


def format_classify(texts: list[str], out: dict) -> str:
    refs = list(out["results"][0]["classifications"]) if out["results"] else []
    header = ["text"] + refs + ["cache"]
    rows = []
    for text, r in zip(texts, out["results"]):
        cells = [_clip(text, 40) + (" [truncated]" if r["truncated"] else "")]
        for ref in refs:
            c = r["classifications"][ref]
            if "label" in c:
                cells.append(f"{c['label']} {c['scores'][c['label']]:.2f}")
            else:
                cells.append(",".join(c["labels"]) or "-")
        cells.append(r["cache"])
        rows.append(cells)
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    cache = out["cache"]
    hits = ", ".join(f"{k} {v}" for k, v in cache["hits"].items())
    lines = [fmt(header)] + [fmt(r) for r in rows]
    lines.append(f"cache: hits {hits}; misses {cache['misses']}; embeddings computed {cache['computed']}"
                 f"   time ms: " + ", ".join(f"{k} {v:.1f}" for k, v in out["timing_ms"].items()))
    return "\n".join(lines)


_RETRAIN_NOTES = {
    "would_retrain": "would retrain from {n_examples} stored examples",
    "no_training_data": "cannot retrain: no stored training data (saved before it was kept); "
                        "train it again with `headfleet train`",
    "bad_training_data": "cannot retrain: {error}",
}


def _retrain_line(r: dict) -> str:
    head = f"{r['tenant']}/{r['classifier']}@{r['version']} ({', '.join(r['aliases'])})"
    if r["status"] == "retrained":
        acc = r["accuracy"]
        fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        note = (f"retrained as {r['new_id']} from {r['n_examples']} stored examples ({r['kind']}, seed {r['seed']}); "
                f"holdout accuracy {fmt(acc['before'])} -> {fmt(acc['after'])}")
    elif r["status"] == "stale":
        note = "trained on backbone " + str(r["parent_fingerprint"] or "unknown")[:12] + (
            "; training data stored" if r["has_training_data"] else "; NO stored training data")
    else:
        note = _RETRAIN_NOTES[r["status"]].format(**r)
    return f"{head:<40} {note}"


def _fig(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def format_monitor(report: dict) -> str:
    """One classifier's monitor report as a table: a row per closed window, then alerts and the retrain."""
    s = report["settings"]
    size = f"{s['window_texts']} texts" if s["window_texts"] else f"{s['window_seconds']:g} s"
    head = (f"{report['classifier']} v{report['version']}  monitoring {'on' if report['enabled'] else 'off'}  "
            f"window {size}  drift: PSI > {s['psi']:g} or domain AUC > {s['domain_auc']:g}  "
            f"accuracy drop: canary < {s['accuracy_slo'] if s['accuracy_slo'] is not None else '-'} "
            f"or {s['accuracy_drop']:g} under holdout")
    cols = ["end", "texts", "psi", "js", "ks", "auc", "mmd2", "canary", "est.acc", "drift", "acc.drop"]
    rows = [[w["end"], str(w["texts"]), _fig(w["label_psi"]), _fig(w["label_js"]), _fig(w["confidence_ks"]),
             _fig(w["domain_auc"]), _fig(w["mmd2"], 4), _fig(w["canary_accuracy"]), _fig(w["estimated_accuracy"]),
             "DRIFT" if w["drift"] else "-", "DROP" if w["accuracy_drop"] else "-"] for w in report["windows"]]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    lines = [head, "  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows] or ["(no closed window yet)"]
    for a in report["alerts"][-10:]:
        lines.append(f"alert {a['at']} {a['kind']}: {json.dumps(a['detail'], ensure_ascii=False)}")
    r = report["retrain"]
    if r["triggered"]:
        lines.append(f"retrain {r.get('state')}: job {r['job']}, candidate {r['candidate'] or '-'} ({r['reason']})")
    return "\n".join(lines)


def _table(cols: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    return ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in [cols, *rows]]


def format_experiments(items: list[dict]) -> str:
    """A row per experiment: id, classifier, control vs. treatment versions, state, decision."""
    rows = [[e["id"], e["classifier"], f"v{e['control']['version']}", f"v{e['treatment']['version']}", e["state"],
             e["decision"] or "-", e["name"]] for e in items]
    return "\n".join(_table(["id", "classifier", "control", "treatment", "state", "decision", "name"], rows))


def format_experiment(r: dict) -> str:
    """One experiment: arms, lift with its CI, Welch, SRM, sequential p, guardrails, slices, recommendation."""
    c = r["config"]
    lines = [f"{r['id']}  {c['name']}  {c['classifier']}: v{c['control']['version']} (control) vs "
             f"v{c['treatment']['version']} (treatment), split {c['split']:g}, metric {c['metric']}, "
             f"min {c['min_samples']} units/arm  {r['state']}" + (f" ({r['decision']}: {r['reason']})" if r["decision"] else "")]
    rows = [[arm, f"v{a['version']}", str(a["n_units"]), _fig(a["mean"], 4), _fig(a["variance"], 4)]
            for arm, a in r["arms"].items()]
    lines += _table(["arm", "version", "units", "mean", "variance"], rows)
    w, ci = r["welch"], r["ci95"]
    lines.append(f"lift {_fig(r['lift'], 4)} (relative {_fig(r['relative_lift'], 4)}), 95% CI "
                 f"[{_fig(ci[0], 4) if ci else '-'}, {_fig(ci[1], 4) if ci else '-'}]; Welch t {_fig(w['t'])}, "
                 f"df {_fig(w['df'], 1)}, p {_fig(w['p'], 4)}; sequential p {_fig(r['sequential_p'], 4)}")
    lines.append(f"sample ratio: p {_fig(r['srm_p'], 4)}" + ("  MISMATCH" if r["srm"] else "  ok"))
    g = r["guardrails"]
    for arm in ("control", "treatment"):
        a = g[arm]
        lines.append(f"guardrails {arm}: p99 {_fig(a['p99_ms'], 2)} ms, error rate {_fig(a['error_rate'], 4)} "
                     f"over {a['requests']} requests" + (f"  BREACHED {a['breached']}" if a["breached"] else ""))
    for seg, s in r["slices"].items():
        lines.append(f"slice {seg}: lift {_fig(s['lift'], 4)}, p {_fig(s['p'], 4)}, units "
                     f"{s['arms']['control']['n_units']}/{s['arms']['treatment']['n_units']}")
    lines.append(f"recommendation: {r['recommendation']} ({r['recommendation_reason']})")
    return "\n".join(lines)


def format_shadow(r: dict) -> str:
    """Live vs. shadow: agreement, the flip matrix, per-label counts and the feedback block."""
    lines = [f"{r['live']} (live) vs {r['shadow']} (shadow): {r['n']} texts, agreement {_fig(r['agreement'])}"]
    for live, row in r["flips"].items():
        lines.append(f"  {live} -> " + ", ".join(f"{k}: {v}" for k, v in row.items()))
    fb = r["with_feedback"]
    lines.append(f"with feedback: {fb['n']} texts, live accuracy {_fig(fb['live_accuracy'])}, shadow accuracy "
                 f"{_fig(fb['shadow_accuracy'])}, negative flips {fb['negative_flips']}, McNemar p {_fig(fb['mcnemar_p'], 4)}")
    return "\n".join(lines)
