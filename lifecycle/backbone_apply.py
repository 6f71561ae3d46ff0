"""Apply a backbone plan, or roll it back, without breaking a service that is serving.

How serving never breaks:

- ``apply`` publishes each planned head as a new version on the candidate backbone **without
  moving a plain alias**; it points that backbone's own aliases (``Registry.set_backbone_aliases``)
  at the new versions. A reader on the old backbone still resolves ``latest`` to the version it
  was serving; a reader on the new one resolves it to the refit version. Old and new replicas can
  serve side by side during a rolling restart, each with versions that load on its backbone.
- The backbone to load is recorded in ``<data dir>/backbone.json`` (it wins over
  ``HEADFLEET_MODEL``/``BACKEND``/``PRECISION``; ``previous`` keeps what it replaced). A service
  picks it up when it starts: restart it (replica by replica) and the alias moves take effect
  with the load, for that replica.
- ``rollback`` writes the previous backbone back (or removes the file when the environment chose
  the previous one). Plain aliases were never moved, so the old backbone serves what it served.
- Before anything is written, ``apply`` checks the plan: a classifier that regressed, has no
  stored data or is a LoRA version (which would not load on the new backbone) refuses the apply,
  naming each, unless forced; and each published head must hash like the one the plan staged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Callable

from headfleet.atomic import write_json_atomic
from headfleet.engine import Engine
from headfleet.errors import ConflictError, ValidationError
from headfleet.heads.registry import WEIGHTS_FILE
from headfleet.heads.retrain import stored_examples
from headfleet.settings import NEW_FOLDER_DEFAULT, Settings, read_backbone_setting

BLOCKING = ("regression", "needs_data", "needs_retrain")


def read_plan(path: Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValidationError(f"no plan at {path}: make one with `headfleet backbone plan --out {path}`") from None
    except ValueError as exc:
        raise ValidationError(f"{path} is not a backbone plan ({exc})") from None
    if not isinstance(doc, dict) or not {"from", "to", "classifiers", "staged"} <= set(doc):
        raise ValidationError(f"{path} is not a backbone plan (made by `headfleet backbone plan`)")
    return doc


def blocking(plan: dict) -> list[dict]:
    """The classifiers that stop an apply: ``{"key", "verdict", "why"}`` each."""
    out = []
    for r in plan["classifiers"]:
        if r["verdict"] in BLOCKING:
            why = "; ".join(r.get("reasons") or []) or r.get("reason") or r["verdict"]
            out.append({"key": r["key"], "verdict": r["verdict"], "why": why})
    return out


def apply(plan_path: Path, settings: Settings, *, force: bool = False,
          open_engine: Callable[[Settings], Engine] = Engine.open,
          progress: Callable[[int, int], None] | None = None) -> dict:
    """Publish the plan's refit heads on its candidate backbone and make that backbone the data
    folder's. ConflictError (exit 2) naming the blocking classifiers unless ``force``; ConflictError
    when the data folder's backbone is no longer the plan's ``from``. Returns what was done."""
    plan = read_plan(plan_path)
    stop = blocking(plan)
    if stop and not force:
        names = ", ".join(f"{b['key']} ({b['verdict']}: {b['why']})" for b in stop)
        raise ConflictError(f"the plan has {len(stop)} classifier(s) that would break or regress on the new "
                            f"backbone: {names}. Fix them, or apply with --force")
    to = plan["to"]
    current = read_backbone_setting(settings.layout.backbone)
    target = dataclasses.replace(settings, model_path=to["model"], backend=to["backend"], precision=to["precision"])
    staged = Path(plan["staged"])
    published: list[dict] = []
    rows = [r for r in plan["classifiers"] if r.get("staged")]
    with open_engine(target) as engine:
        if engine.embedder.fingerprint != to["fingerprint"]:
            raise ConflictError(f"the backbone at {to['model']} ({to['backend']}/{to['precision']}) is not the one "
                                "planned (its fingerprint changed): plan again")
        if current is not None and current.get("fingerprint") not in (None, plan["from"]["fingerprint"]):
            raise ConflictError("the data folder's backbone changed since the plan was made: plan again")
        by_classifier: dict[tuple[str, str], dict[str, int]] = {}
        for i, r in enumerate(rows):
            tenant, name = r["tenant"], r["classifier"]
            old = engine.registry.resolve(tenant, f"{name}@{r['version']}")
            examples = stored_examples(engine.registry, tenant, old)
            manifest = engine.train(tenant, name, examples, kind=r["kind"], seed=r["seed"], move_alias=False,
                                    provenance={"upgraded_from": {"version": r["version"],
                                                                  "parent_fingerprint": plan["from"]["fingerprint"]}})
            want = hashlib.sha256((staged / r["staged"] / WEIGHTS_FILE).read_bytes()).hexdigest()
            if manifest["weights"]["sha256"] != want:
                raise ConflictError(f"{r['key']}: the head published now differs from the one the plan staged "
                                    "(another cache, data or library version): plan again")
            for alias in r["aliases"]:
                by_classifier.setdefault((tenant, name), {})[alias] = int(manifest["version"])
            published.append({"key": r["key"], "new_version": manifest["version"], "aliases": r["aliases"]})
            if progress is not None:
                progress(i + 1, len(rows))
        for (tenant, name), aliases in by_classifier.items():
            engine.registry.set_backbone_aliases(tenant, name, to["fingerprint"], aliases)
    setting = {"model": to["model"], "backend": to["backend"], "precision": to["precision"],
               "fingerprint": to["fingerprint"], "applied": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "plan": str(Path(plan_path).resolve()), "forced": bool(stop), "previous": current}
    write_json_atomic(settings.layout.backbone, setting)
    return {"backbone": setting, "published": published, "forced_past": stop if force else []}


def rollback(settings: Settings) -> dict:
    """Put the previous backbone back (``previous`` of the setting; none: the environment's). Plain
    aliases were never moved by apply, so nothing else changes. ConflictError when nothing was applied."""
    path = settings.layout.backbone
    current = read_backbone_setting(path)
    if current is None:
        raise ConflictError("no backbone was applied to this data folder: nothing to roll back")
    previous = current.get("previous")
    if previous is None and current.get("chosen") == NEW_FOLDER_DEFAULT:
        raise ConflictError("this data folder's backbone is the one it started on (recorded when it was new): "
                            "nothing was applied to roll back")
    if previous is None:
        path.unlink()
    else:
        write_json_atomic(path, previous)
    return {"rolled_back": {k: current.get(k) for k in ("model", "backend", "precision", "fingerprint")},
            "now": previous or "the environment's backbone (HEADFLEET_MODEL / BACKEND / PRECISION)"}
