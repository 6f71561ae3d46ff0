"""``headfleet reproduce NAME@V``: refit a version from its stored data and say whether it comes out the same.

Exit status: 0 when it matches (exactly, or within the tolerance the report states), 1 when it does
not, 2 on an error (``main`` maps a HeadfleetError to 2: no such version, no stored data, ...).
Nothing is published; the refit runs on the backbone the settings name (``lifecycle.reproduce``).
"""

from __future__ import annotations

import argparse

from headfleet.service.cli_output import _print_json, progress_bar


def add_parser(sub, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register ``reproduce`` on the ``headfleet`` subparsers ``sub`` (``common``: the shared options)."""
    r = sub.add_parser("reproduce", parents=[common],
                       help="retrain a version from its stored data with its recorded seed and settings (nothing "
                            "is published) and report whether its weights and holdout metrics match; exit 0 if "
                            "they do, 1 if not")
    r.add_argument("ref", metavar="NAME@V", help="the version: name@version, name@alias or name (latest)")
    r.set_defaults(func=cmd_reproduce)
    return r


def cmd_reproduce(args) -> int:
    from headfleet.engine import Engine
    from headfleet.lifecycle.reproduce import reproduce
    from headfleet.service.cli import _settings

    with Engine.open(_settings(args)) as engine:
        n = (engine.registry.resolve(args.tenant, args.ref).get("training_data") or {}).get("n_examples", 0)
        with progress_bar(int(n or 0), "embedding") as cb:
            out = reproduce(engine, args.tenant, args.ref, progress=cb)
    if args.json:
        _print_json(out)
    else:
        print(format_reproduction(out))
    return 0 if out["match"] else 1


def format_reproduction(out: dict) -> str:
    """The report as a few lines: verdict, hashes, metrics, how it was compared, differences, unknowns."""
    w = out["weights_sha256"]
    if out["match"]:
        how = "exactly" if out["comparison"] == "exact" else "within tolerance"
        head = f"{out['id']} ({out['kind']}) reproduces {how}: weights sha256 {_short(w['now'])}" + (
            " as recorded" if w["now"] in (w["recorded"], w.get("recorded_rewritten")) else
            f" (recorded {_short(w['recorded'])}; largest weight difference {out['weights_max_abs_diff']})")
    else:
        head = (f"{out['id']} ({out['kind']}) does NOT reproduce: weights sha256 {_short(w['recorded'])} recorded, "
                f"{_short(w['now'])} now")
    lines = [head]
    rec, now = out["metrics"]["recorded"], out["metrics"]["now"]
    if rec:
        lines.append("holdout " + "; ".join(f"{_METRIC_NAMES.get(k, k)} {_num(rec[k])} recorded, {_num(now.get(k))} now"
                                            for k in rec))
    tol = out["tolerance"]
    lines.append(f"compared: {out['comparison']} ({out['why']})" + ("" if tol is None else "; tolerance: " + ", ".join(
        f"{k} {v}" for k, v in tol.items() if v is not None)))
    if out["differences"]:
        lines.append("differences:")
        for d in out["differences"]:
            what = d["what"] + (f" {d['name']}" if d.get("name") else "")
            lines.append(f"  {what}: {_short(d['recorded'])} recorded, {_short(d['now'])} now")
    else:
        lines.append("differences: none")
    if out["unknown"]:
        lines.append(f"not recorded with this version (unknown): {', '.join(out['unknown'])}")
    return "\n".join(lines)


_METRIC_NAMES = {"macro_f1": "macro-F1"}


def _short(value) -> str:
    text = str(value)
    return text[:12] + "…" if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text


def _num(value) -> str:
    return "-" if value is None else f"{value:.3f}"
