"""The retraining a trigger starts: data, candidate training, and the candidate's review.

Data = the live version's stored training data, with the feedback labels (a text with feedback
takes its feedback label; new texts are added), plus a **class-balanced replay sample** of older
versions' training data (at most ``replay_per_class`` texts per label, texts not already present),
so a candidate that learns the new traffic does not forget the old.

The candidate is published **without moving ``latest``**; the ``candidate`` alias moves to it
(``Engine.train(..., candidate=True)``). Before it is published it is reviewed, and its manifest's
``retrain`` entry records why it was made and how it compares:

    trigger                 the windows (and their figures) that fired the trigger
    canary_accuracy         the candidate on the canary set;  live_canary_accuracy: the live version's
    previous_holdout_accuracy   the candidate on the live version's holdout rows (the old data)
    live_holdout_accuracy       the live version's recorded holdout accuracy
    regression              true when the candidate loses more than ``accuracy_drop`` on the old holdout

The manifest's ``canary_hash`` is the hash of that canary set (frozen core plus rolling feedback, by
the training-data hash rule), null when there was none, so the figures can be traced to their data.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from headfleet.engine import Engine
from headfleet.heads.examples import Examples, content_hash
from headfleet.heads.retrain import stored_examples
from headfleet.lifecycle import signals
from headfleet.lifecycle.feedback import Labelled, text_key
from headfleet.lifecycle.probe import predictions

REPLAY_PER_CLASS = 50


def retraining_data(engine: Engine, tenant: str, live: dict, feedback: Labelled, *,
                    replay_per_class: int = REPLAY_PER_CLASS, seed: int = 0) -> Examples:
    """Examples for the candidate; raises NotFoundError/CorruptVersionError for a damaged live version,
    ValidationError when the live version has no stored training data (saved before data was kept)."""
    from headfleet.errors import ValidationError

    base = stored_examples(engine.registry, tenant, live)
    if base is None:
        raise ValidationError(f"{live['id']} has no stored training data; train it again from its source")
    fb = {text_key(t): (t, lab) for t, lab in zip(feedback.texts, feedback.labels)}
    texts, labels = [], []
    for t, lab in zip(base.texts, base.labels):
        k = text_key(t)
        t2, lab2 = fb.pop(k, (t, lab))
        texts.append(t2)
        labels.append(lab2)
    for t, lab in fb.values():
        texts.append(t)
        labels.append(lab)
    present = {text_key(t) for t in texts}
    rng = np.random.default_rng(seed)
    for older in _older_versions(engine, tenant, live):
        pool = [(t, lab) for t, lab in zip(older.texts, older.labels) if text_key(t) not in present]
        by_class: dict[str, list] = {}
        for t, lab in pool:
            by_class.setdefault(str(lab), []).append((t, lab))
        for rows in by_class.values():
            for i in rng.permutation(len(rows))[:replay_per_class]:
                t, lab = rows[int(i)]
                texts.append(t)
                labels.append(lab)
                present.add(text_key(t))
    return Examples(texts, labels, base.multi_label)


def _older_versions(engine: Engine, tenant: str, live: dict) -> list[Examples]:
    out = []
    for v in engine.registry.versions(tenant, live["name"]):
        if v >= int(live["version"]):
            continue
        try:
            manifest = engine.registry.resolve(tenant, f"{live['name']}@{v}")
            ex = stored_examples(engine.registry, tenant, manifest)
        except Exception:  # a damaged older version only costs its replay sample
            continue
        if ex is not None and ex.multi_label == live["multi_label"]:
            out.append(ex)
    return out


def make_review(engine: Engine, tenant: str, live: dict, canary: Labelled, live_canary: float | None,
                trigger: dict, accuracy_drop: float, embed: Callable) -> Callable[[Any], dict]:
    """``review(head) -> {"retrain": {...}, "canary_hash": str | None}``: the candidate head scored on the
    canary and on the live version's holdout rows (embeddings through ``embed``, i.e. the cache), before
    it is published; ``canary_hash`` names the canary it was scored on."""
    from headfleet.lifecycle.profile import holdout_rows

    canary_hash = content_hash(canary.texts, canary.labels, live["multi_label"]) if canary.texts else None

    def review(head) -> dict:
        entry: dict[str, Any] = {"trigger": trigger, "from": live["id"], "live_canary_accuracy": live_canary,
                                 "canary_accuracy": None, "previous_holdout_accuracy": None,
                                 "live_holdout_accuracy": (live.get("metrics") or {}).get("accuracy"),
                                 "regression": False}
        if canary.texts:
            vecs = embed(tenant, canary.texts).vectors
            pred = predictions(head.predict_proba(vecs), head.labels, head.multi_label)
            entry["canary_accuracy"] = round(signals.canary_scores(canary.labels, pred, head.labels)[0], 6)
        old = stored_examples(engine.registry, tenant, live)
        if old is not None:
            seed = int((live.get("metrics") or {}).get("seed") or 0)
            hold = holdout_rows(old, seed)
            if len(hold):
                texts = [old.texts[i] for i in hold]
                truth = [old.labels[i] for i in hold]
                pred = predictions(head.predict_proba(embed(tenant, texts).vectors), head.labels, head.multi_label)
                acc = signals.canary_scores(truth, pred, head.labels)[0]
                entry["previous_holdout_accuracy"] = round(acc, 6)
                ref = entry["live_holdout_accuracy"]
                entry["regression"] = bool(ref is not None and acc < ref - accuracy_drop)
        return {"retrain": entry, "canary_hash": canary_hash}

    return review
