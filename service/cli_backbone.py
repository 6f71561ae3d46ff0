"""``headfleet backbone plan | apply | rollback``: upgrade the shared backbone behind a gate.

``plan`` compares every dependent classifier on the current and a candidate backbone
(``lifecycle.backbone_plan``) and exits 0 whatever the verdicts (they are in the plan); ``apply``
publishes the plan's refit heads on the candidate and records it as the data folder's backbone,
refusing (exit 2) when a classifier would regress or break; ``rollback`` restores the previous one
(``lifecycle.backbone_apply``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from headfleet.service.cli_output import _print_json
from headfleet.settings import PRECISIONS


def add_parser(sub, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    b = sub.add_parser("backbone", help="upgrade the shared backbone: plan (compare every classifier), apply, rollback")
    bsub = b.add_subparsers(dest="backbone_cmd", required=True)
    p = bsub.add_parser("plan", parents=[common], help="compare every classifier on the current and a candidate backbone")
    p.add_argument("--to", metavar="MODEL_DIR", help="the candidate model folder (default: the current one)")
    p.add_argument("--backend", choices=["torch", "onnx"], help="the candidate's backend (default: the current)")
    p.add_argument("--precision", choices=PRECISIONS, help="the candidate's precision (default: the current)")
    p.add_argument("--all-tenants", action="store_true", help="every tenant of the data folder (else --tenant's)")
    p.add_argument("--max-drop", type=float, default=0.01, help="accuracy drop allowed, holdout or canary (default 0.01)")
    p.add_argument("--max-negative-flips", type=float, default=0.02,
                   help="right-to-wrong flips allowed, as a share of the holdout (default 0.02)")
    p.add_argument("--out", help="the plan file (default: <data dir>/backbone-plan.json; the same --out resumes)")
    p.add_argument("--progress-file", metavar="FILE",
                   help='rewrite FILE with {"done": N, "total": M} after each classifier (the HTTP plan job reads it)')
    p.set_defaults(func=cmd_plan)
    a = bsub.add_parser("apply", parents=[common], help="publish a plan's refit heads and switch the data folder's backbone")
    a.add_argument("plan", help="the plan file")
    a.add_argument("--force", action="store_true", help="apply even when classifiers regress or would not load")
    a.set_defaults(func=cmd_apply)
    r = bsub.add_parser("rollback", parents=[common], help="restore the backbone the last apply replaced")
    r.set_defaults(func=cmd_rollback)
    return b


def _plan_path(args, settings) -> Path:
    return Path(args.out) if args.out else settings.layout.root / "backbone-plan.json"


def cmd_plan(args) -> int:
    from tqdm import tqdm

    from headfleet.atomic import write_json_atomic
    from headfleet.engine import Engine
    from headfleet.errors import ValidationError
    from headfleet.lifecycle.backbone_plan import Thresholds, plan
    from headfleet.lifecycle.feedback import FeedbackBook
    from headfleet.lifecycle.settings import MonitorSettings
    from headfleet.lifecycle.store import open_store
    from headfleet.service.cli import _settings

    settings = _settings(args)
    target = dataclasses.replace(settings, model_path=args.to or settings.model_path,
                                 backend=args.backend or settings.backend, precision=args.precision or settings.precision)
    for name, value in (("--max-drop", args.max_drop), ("--max-negative-flips", args.max_negative_flips)):
        if not 0.0 <= value <= 1.0:
            raise ValidationError(f"{name} is a fraction from 0 to 1, got {value}")
    book = FeedbackBook(open_store(settings))
    rolling = MonitorSettings().rolling_canary

    def canary_for(tenant: str, name: str):
        found = book.canary(tenant, name, rolling)
        return found if found.texts else None

    with Engine.open(settings) as current, Engine.open(target) as candidate:
        if candidate.embedder.fingerprint == current.embedder.fingerprint:
            raise ValidationError("the candidate is the backbone in use (same fingerprint): name another with --to, "
                                  "--backend or --precision")
        tenants = current.registry.tenants() if args.all_tenants else [args.tenant]
        out = _plan_path(args, settings)
        with tqdm(total=0, desc="classifiers", unit="clf", file=sys.stderr, disable=args.json) as bar:
            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.n = done
                bar.refresh()
                if args.progress_file:
                    write_json_atomic(Path(args.progress_file), {"done": done, "total": total, "at": time.time()})

            if args.progress_file:
                write_json_atomic(Path(args.progress_file), {"done": 0, "total": None, "at": time.time()})

            doc = plan(current, candidate, tenants, out=out, canary_for=canary_for, progress=progress,
                       thresholds=Thresholds(max_drop=args.max_drop, max_negative_flips=args.max_negative_flips))
    if args.json:
        _print_json(doc)
    else:
        print(format_plan(doc, out))
    return 0


def format_plan(doc: dict, out: Path) -> str:
    s = doc["summary"]
    lines = [f"plan {out}: {doc['from']['backend']}/{doc['from']['precision']} {doc['from']['fingerprint'][:12]} -> "
             f"{doc['to']['backend']}/{doc['to']['precision']} {doc['to']['fingerprint'][:12]} ({doc['to']['model']})",
             f"{s['classifiers']} classifier versions: {s['pass']} pass, {s['regression']} regression, "
             f"{s['needs_data']} need data, {s['needs_retrain']} need a retrain (LoRA); {doc['seconds']:.1f} s"]
    for w in s["worst"]:
        drop = w["holdout_drop"]
        lines.append(f"  {w['key']:40s} {w['verdict']:10s} holdout drop {drop if drop is not None else '-':>8} "
                     f"negative flips {w['negative_flips']}")
    for r in doc["classifiers"]:
        if r["verdict"] in ("needs_data", "needs_retrain"):
            lines.append(f"  {r['key']:40s} {r['verdict']}: {r['reason']}")
    lines.append(f"apply with: headfleet backbone apply {out}")
    return "\n".join(lines)


def cmd_apply(args) -> int:
    from headfleet.lifecycle.backbone_apply import apply
    from headfleet.service.cli import _settings

    done = apply(Path(args.plan), _settings(args), force=args.force)
    if args.json:
        _print_json(done)
    else:
        b = done["backbone"]
        print(f"applied: {len(done['published'])} refit version(s) published on {b['backend']}/{b['precision']} "
              f"{b['fingerprint'][:12]}; the data folder's backbone is now {b['model']}. A running service keeps "
              "serving the old backbone until it reloads (POST /admin/backbone/reload) or restarts; "
              "`headfleet backbone rollback` goes back.")
        for f in done["forced_past"]:
            print(f"  forced past {f['key']} ({f['verdict']}: {f['why']})")
    return 0


def cmd_rollback(args) -> int:
    from headfleet.lifecycle.backbone_apply import rollback
    from headfleet.service.cli import _settings

    done = rollback(_settings(args))
    if args.json:
        _print_json(done)
    else:
        print(f"rolled back from {done['rolled_back']['backend']}/{done['rolled_back']['precision']} "
              f"{(done['rolled_back']['fingerprint'] or '')[:12]}; now: {done['now']}. A running service loads it at "
              "POST /admin/backbone/reload or a restart.")
    return 0
