"""The backbone-upgrade gate: every dependent classifier compared on the current and a candidate backbone.

For each aliased version of each classifier (``latest``, ``candidate``, ``prod``, ...) with stored
training data, on equal terms (the published head was refit on every example, holdout included,
so it cannot be scored on its holdout):

    split        = holdout_split(labels, seed=recorded seed, share=recorded holdout)   # heads/split.py
    old_head     = fit(recorded kind, seed) on current embeddings of split.train
    new_head     = fit(recorded kind, seed) on candidate embeddings of split.train
    on split.holdout (and on the canary set, when one exists):
        accuracy, macro-F1 of each; negative flips = right before and wrong after;
        McNemar's exact test on the discordant pairs (binomial, scipy.stats.binomtest)
    verdict      = "regression" when accuracy drops by more than max_drop (absolute, holdout or
                   canary) or negative flips exceed max_negative_flips (a share of the holdout),
                   else "pass"; "needs_data" without stored data, or with stored data that
                   cannot be compared (a damaged file, data today's rules refuse: the reason says
                   which; the plan goes on with the other versions, and a rerun tries it again);
                   "needs_retrain" for a LoRA version (its adapter was trained on the old
                   backbone's activations)
    staged       = the head refit on every example with candidate embeddings: what apply publishes

Embeddings go through each engine's cache (the candidate's under its own fingerprint), so a second
plan costs no forward. The plan is resumable: each finished classifier is appended to
``<out>.partial.jsonl`` and skipped by a rerun with the same ``out`` and the same two backbones.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from scipy import stats as sps

from headfleet.atomic import write_json_atomic
from headfleet.engine import Engine
from headfleet.errors import TrainingDataError
from headfleet.heads.metrics import classification_metrics
from headfleet.heads.retrain import stored_examples
from headfleet.heads.split import holdout_split
from headfleet.heads.train import DEFAULT_HOLDOUT, train_head
from headfleet.heads.validation import validate

log = logging.getLogger(__name__)

WORST = 10  # classifiers listed in the summary's worst list


@dataclasses.dataclass(frozen=True)
class Thresholds:
    max_drop: float = 0.01  # absolute accuracy drop allowed, holdout or canary (a fraction)
    max_negative_flips: float = 0.02  # right-before-wrong-after, as a share of the holdout


def describe(embedder) -> dict:
    """A backbone as a plan records it: fingerprint, model folder, backend, precision, dimension."""
    return {"fingerprint": embedder.fingerprint, "model": str(embedder.folder), "backend": embedder.backend,
            "precision": embedder.precision, "dim": int(embedder.dim)}


def aliased_versions(engine: Engine, tenant: str) -> list[tuple[str, int, list[str]]]:
    """``(name, version, aliases)`` for every version an alias of a tenant's classifier points at."""
    out = []
    for c in engine.registry.list(tenant):
        by_version: dict[int, list[str]] = {}
        for alias, v in sorted(engine.registry.aliases(tenant, c["name"]).items()):
            by_version.setdefault(int(v), []).append(alias)
        out += [(c["name"], v, aliases) for v, aliases in sorted(by_version.items())]
    return out


def _right(pred: np.ndarray, truth: np.ndarray, multi: bool) -> np.ndarray:
    return (pred == truth).all(axis=1) if multi else pred == truth


def _predict(head, X: np.ndarray, multi: bool) -> np.ndarray:
    probs = head.predict_proba(X)
    return (probs >= 0.5).astype(int) if multi else probs.argmax(axis=1)


def compare(X_old: np.ndarray, X_new: np.ndarray, examples, *, kind: str, seed: int, holdout: float,
            thresholds: Thresholds, canary: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> dict:
    """One version's comparison (see the module docstring). ``X_old``/``X_new``: [n, d_old] and
    [n, d_new] embeddings of ``examples.texts``; ``canary``: (old [m, d_old], new [m, d_new],
    targets [m] or [m, L] in the version's label order). Returns the figures and the verdict."""
    multi, classes = examples.multi_label, examples.classes()
    y = examples.targets()
    split = holdout_split(y, multi, holdout, seed)
    # each head fitted on the recorded train split alone, as training fitted it before measuring
    # its holdout: train_head makes the same split (same seed and share) over the whole data's
    # labels, so a label absent from the split is still a column; validated once for both
    report = validate(examples)
    heads = [train_head(X, examples, kind=kind, seed=seed, holdout=holdout, report=report).head
             for X in (X_old, X_new)]
    out: dict[str, Any] = {"canary": None}
    parts = {"holdout": (X_old[split.holdout], X_new[split.holdout], y[split.holdout])}
    if canary is not None:
        parts["canary"] = canary
    for part, (Xo, Xn, truth) in parts.items():
        before, after = _predict(heads[0], Xo, multi), _predict(heads[1], Xn, multi)
        ok_b, ok_a = _right(before, truth, multi), _right(after, truth, multi)
        neg, pos = int((ok_b & ~ok_a).sum()), int((~ok_b & ok_a).sum())
        mb = classification_metrics(truth, before, classes, multi)
        ma = classification_metrics(truth, after, classes, multi)
        out[part] = {"n": int(len(truth)), "accuracy": {"before": mb["accuracy"], "after": ma["accuracy"]},
                     "macro_f1": {"before": mb["macro_f1"], "after": ma["macro_f1"]},
                     "negative_flips": neg, "positive_flips": pos,
                     "mcnemar_p": float(sps.binomtest(neg, neg + pos, 0.5).pvalue) if neg + pos else None}
    reasons = []
    for part in ("holdout", "canary"):
        fig = out[part]
        if fig is None or not fig["n"]:
            continue
        drop = fig["accuracy"]["before"] - fig["accuracy"]["after"]
        fig["drop"] = round(drop, 6)
        if drop > thresholds.max_drop + 1e-12:
            reasons.append(f"{part} accuracy {fig['accuracy']['before']:.3f} -> {fig['accuracy']['after']:.3f}")
    h = out["holdout"]
    h["negative_flip_share"] = round(h["negative_flips"] / h["n"], 6) if h["n"] else 0.0
    if h["negative_flip_share"] > thresholds.max_negative_flips + 1e-12:
        reasons.append(f"{h['negative_flips']} of {h['n']} holdout examples flip from right to wrong")
    out["verdict"] = "regression" if reasons else "pass"
    out["reasons"] = reasons
    return out


def plan(current: Engine, candidate: Engine, tenants: Sequence[str], *, out: Path,
         thresholds: Thresholds = Thresholds(), canary_for: Callable[[str, str], Any] | None = None,
         progress: Callable[[int, int], None] | None = None) -> dict:
    """Compare every aliased version of ``tenants``' classifiers on ``current`` and ``candidate``;
    write the plan to ``out`` (JSON, atomically) with the staged heads in ``<out>.staged/``.

    ``canary_for(tenant, name) -> Labelled | None``: the canary set (monitoring's), when one exists.
    ``progress(done, total)``: after each version. Returns the plan."""
    from headfleet.lifecycle.feedback import as_examples

    out = Path(out)
    staged = out.with_name(out.name + ".staged")
    partial = out.with_name(out.name + ".partial.jsonl")
    key = {"from": current.embedder.fingerprint, "to": candidate.embedder.fingerprint}
    done: dict[str, dict] = {}
    if partial.exists():
        for line in partial.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line torn by the interruption: that classifier runs again
            if row.get("backbones") == key:
                done[row["key"]] = row
    todo = [(t, name, v, aliases) for t in tenants for name, v, aliases in aliased_versions(current, t)]
    t0 = time.perf_counter()
    if progress is not None:
        progress(0, len(todo))
    with open(partial, "a", encoding="utf-8") as log_file:
        for i, (tenant, name, version, aliases) in enumerate(todo):
            k = f"{tenant}/{name}@{version}"
            if k not in done:
                row = _one(current, candidate, tenant, name, version, aliases, thresholds, canary_for, staged,
                           as_examples)
                row.update(key=k, backbones=key)
                if not row.pop("error", False):  # a rerun tries a version whose data failed again
                    log_file.write(json.dumps(row) + "\n")
                    log_file.flush()
                done[k] = row
            if progress is not None:
                progress(i + 1, len(todo))
    rows = [done[f"{t}/{n}@{v}"] for t, n, v, _ in todo]
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("pass", "regression", "needs_data", "needs_retrain")}
    worst = sorted((r for r in rows if r["verdict"] in ("pass", "regression")),
                   key=lambda r: -(r["holdout"].get("drop") or 0.0))[:WORST]
    doc = {"from": describe(current.embedder), "to": describe(candidate.embedder),
           "thresholds": dataclasses.asdict(thresholds), "tenants": list(tenants), "created": time.time(),
           "seconds": round(time.perf_counter() - t0, 3), "staged": str(staged), "summary": {
               "classifiers": len(rows), **counts,
               "worst": [{"key": r["key"], "verdict": r["verdict"], "holdout_drop": r["holdout"].get("drop"),
                          "negative_flips": r["holdout"]["negative_flips"]} for r in worst]},
           "classifiers": rows}
    write_json_atomic(out, doc)
    return doc


def _one(current: Engine, candidate: Engine, tenant: str, name: str, version: int, aliases: list[str],
         thresholds: Thresholds, canary_for, staged: Path, as_examples) -> dict:
    manifest = current.registry.resolve(tenant, f"{name}@{version}")
    base = {"tenant": tenant, "classifier": name, "version": version, "aliases": aliases,
            "kind": manifest.get("type") or (manifest.get("metrics") or {}).get("kind")}
    try:
        return base | _compared(current, candidate, tenant, name, version, manifest, thresholds, canary_for, staged,
                                as_examples)
    except TrainingDataError as e:  # this version's data, not the backbones: the plan goes on
        # (a candidate giving bad vectors is a ValidationError of the embeddings: that stops the plan)
        log.warning("backbone plan: %s/%s@%s needs data: %s", tenant, name, version, e)
        return base | {"verdict": "needs_data", "reason": f"its stored training data cannot be compared: {e}",
                       "holdout": {"negative_flips": 0}, "error": True}


def _compared(current: Engine, candidate: Engine, tenant: str, name: str, version: int, manifest: dict,
              thresholds: Thresholds, canary_for, staged: Path, as_examples) -> dict:
    """:func:`_one`'s verdict and figures for a version whose manifest is read (TrainingDataError
    when its stored data cannot be compared)."""
    if manifest.get("adapter"):
        return {"verdict": "needs_retrain", "reason": "a LoRA adapter is trained on the backbone's own "
                       "activations: train it again on the new backbone", "holdout": {"negative_flips": 0}}
    examples = stored_examples(current.registry, tenant, manifest)
    if examples is None:
        return {"verdict": "needs_data", "reason": "no training data stored with this version",
                       "holdout": {"negative_flips": 0}}
    metrics = manifest.get("metrics") or {}
    kind, seed = metrics.get("kind", "logreg"), int(metrics.get("seed", 0))
    holdout = float(metrics.get("holdout_fraction", DEFAULT_HOLDOUT))
    X_old = current.embed(tenant, examples.texts).vectors
    X_new = candidate.embed(tenant, examples.texts).vectors
    canary = None
    labelled = canary_for(tenant, name) if canary_for is not None else None
    if labelled is not None and labelled.texts:
        can = as_examples(labelled, examples.multi_label)
        order = {c: i for i, c in enumerate(examples.classes())}
        if set(can.classes()) <= set(order):
            t = can.targets()
            if examples.multi_label:  # columns in the version's label order
                cols = [order[c] for c in can.classes()]
                y = np.zeros((len(t), len(order)), dtype=int)
                y[:, cols] = t
            else:
                y = np.array([order[can.classes()[j]] for j in t])
            canary = (current.embed(tenant, can.texts).vectors,
                      candidate.embed(tenant, can.texts).vectors, y)
    figures = compare(X_old, X_new, examples, kind=kind, seed=seed, holdout=holdout, thresholds=thresholds,
                      canary=canary)
    head = train_head(X_new, examples, kind=kind, seed=seed, holdout=holdout, refit=True)
    folder = staged / tenant / f"{name}@{version}"
    head.head.save(folder)
    return figures | {"kind": kind, "seed": seed, "staged": str(folder.relative_to(staged))}
