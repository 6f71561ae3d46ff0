"""Labelled data about live traffic: feedback per text, and the canary set.

Feedback belongs to a classifier (every version): one entry per *text*, keyed by the sha256 of
its normalised form, so the last label sent for a text wins and a re-sent text does not count
twice. The **canary** is a frozen core the tenant uploads (``PUT .../canary``) plus a rolling
part: the newest ``rolling_canary`` feedback items whose texts are not in the core. Both are
checked against the label schema of the version ``latest`` points at, by the one label rule
(``headfleet.heads.labels``): a label outside the schema refuses the whole body, naming the item.

Storage: one JSON document per classifier and kind in the :class:`~headfleet.lifecycle.store.StateStore`
(``<tenant>/<name>/feedback``, ``<tenant>/<name>/canary``), read-modified-written under the
classifier's lock, so concurrent replicas add up instead of overwriting each other.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from typing import Any, NamedTuple, Sequence

from headfleet.cache.keys import normalise_text
from headfleet.errors import ValidationError
from headfleet.heads.examples import Examples, content_hash
from headfleet.heads.labels import LabelReader, refuse_lone_surrogate
from headfleet.text import blank_message, is_blank


class Labelled(NamedTuple):
    """Texts with labels (a str each, or a sorted list for multi-label classifiers)."""

    texts: list[str]
    labels: list[Any]


def text_key(text: str) -> str:
    """The identity of a text for feedback: sha256 hex of its normalised form (what the cache keys on)."""
    return hashlib.sha256(normalise_text(text).encode("utf-8")).hexdigest()


def check_items(items: Sequence[Any], schema: Sequence[str], multi_label: bool, what: str = "items") -> Labelled:
    """``[{"text", "label"}]`` (or ``"labels": [...]`` for multi-label) checked against ``schema``.

    Raises ValidationError (422) naming ``what[i]`` for a missing or blank text, a lone
    surrogate, a missing label or one outside ``schema`` — the whole body is refused, nothing is
    stored. Labels come back canonical (``"1"`` for 1, ``"true"`` for True)."""
    if not isinstance(items, (list, tuple)) or not items:
        raise ValidationError(f"{what} must be a non-empty list of {{\"text\", \"label\"}} objects", param=what)
    reader, allowed = LabelReader(multi_label), set(schema)
    field = "labels" if multi_label else "label"
    texts, labels = [], []
    for i, item in enumerate(items):
        where = f"{what}[{i}]"
        if not isinstance(item, dict):
            raise ValidationError(f"{where} must be an object with \"text\" and \"{field}\"", param=what)
        unknown = sorted(set(item) - {"text", "label", "labels"})
        if unknown:
            raise ValidationError(f"{where} has unknown field(s) {unknown}", param=what)
        text = item.get("text")
        if not isinstance(text, str) or is_blank(text):
            raise ValidationError(blank_message(f"{where}.text") if isinstance(text, str)
                                  else f"{where}.text must be a string", param=what)
        refuse_lone_surrogate(text, where, "the text")
        raw = item.get(field, item.get("label") if multi_label else None)
        if raw is None:
            raise ValidationError(f"{where} has no \"{field}\"", param=what)
        try:
            label = reader.read(raw, where)
        except ValidationError as e:
            raise ValidationError(e.message, param=what) from None
        bad = [x for x in (label if multi_label else [label]) if x not in allowed]
        if bad or (not multi_label and label == ""):
            raise ValidationError(f"{where}: label {(bad or [label])[0]!r} is not one of this classifier's "
                                  f"labels {sorted(allowed)}", param=what)
        texts.append(text)
        labels.append(label)
    return Labelled(texts, labels)


class FeedbackBook:
    """Feedback and canary documents of one store; every method takes ``(tenant, name)``."""

    def __init__(self, store):
        self.store = store

    # -- feedback --------------------------------------------------------------------------------
    def add(self, tenant: str, name: str, items: Labelled, keep: int) -> int:
        """Store each (text, label), replacing an earlier label for the same text; keeps the newest
        ``keep`` texts. Returns how many items were accepted (all of them)."""
        key = f"{tenant}/{name}/feedback"
        now = time.time()
        with self.store.lock(f"{tenant}/{name}"):
            doc = _load(self.store.get(key), {"items": {}})
            entries: dict[str, list] = doc["items"]
            for text, label in zip(items.texts, items.labels):
                k = text_key(text)
                entries.pop(k, None)  # re-insert: dicts keep insertion order, newest last
                entries[k] = [text, label, now]
            while len(entries) > keep:
                entries.pop(next(iter(entries)))
            self.store.put(key, _dump(doc))
        return len(items.texts)

    def feedback(self, tenant: str, name: str) -> Labelled:
        """Every stored feedback item, oldest first."""
        doc = _load(self.store.get(f"{tenant}/{name}/feedback"), {"items": {}})
        rows = list(doc["items"].values())
        return Labelled([r[0] for r in rows], [r[1] for r in rows])

    # -- canary ----------------------------------------------------------------------------------
    def set_canary(self, tenant: str, name: str, items: Labelled, multi_label: bool) -> dict:
        """Replace the frozen core; returns ``{"hash", "size", "per_label"}`` (hash: the training-data
        hash rule, so the same examples from JSON, CSV or JSONL hash alike)."""
        digest = content_hash(items.texts, items.labels, multi_label)
        doc = {"texts": items.texts, "labels": items.labels, "hash": digest, "multi_label": multi_label}
        with self.store.lock(f"{tenant}/{name}"):
            self.store.put(f"{tenant}/{name}/canary", _dump(doc))
        return {"hash": digest, "size": len(items.texts), "per_label": label_counts(items.labels)}

    def canary_info(self, tenant: str, name: str, rolling: int) -> dict | None:
        """``{"hash", "size", "per_label", "rolling"}``, or None when no canary was set and no
        feedback exists."""
        core = self._core(tenant, name)
        roll = self._rolling(tenant, name, core, rolling)
        if core is None and not roll.texts:
            return None
        texts = core.texts if core else []
        labels = core.labels if core else []
        doc = _load(self.store.get(f"{tenant}/{name}/canary"), {})
        return {"hash": doc.get("hash"), "size": len(texts), "per_label": label_counts(labels),
                "rolling": len(roll.texts)}

    def scored_hash(self, tenant: str, name: str, rolling: int) -> str | None:
        """The ``canary_hash`` a version records: the training-data hash (``heads.examples.content_hash``)
        of the canary set as the monitor scores it — the frozen core then up to ``rolling`` feedback
        items — so a job's version and a monitor candidate name the same set the same way. None when
        there is no canary."""
        labelled, doc = self._canary(tenant, name, rolling)
        if not labelled.texts:
            return None
        return content_hash(labelled.texts, labelled.labels, bool((doc or {}).get("multi_label", False)))

    def canary(self, tenant: str, name: str, rolling: int) -> Labelled:
        """The canary examples to score: the frozen core, then the rolling part (may be empty)."""
        return self._canary(tenant, name, rolling)[0]

    def _canary(self, tenant: str, name: str, rolling: int) -> tuple[Labelled, dict | None]:
        """The canary as scored, and the stored core's document (None without one), read once."""
        doc = _load(self.store.get(f"{tenant}/{name}/canary"), None)
        core = None if doc is None else Labelled(doc["texts"], doc["labels"])
        roll = self._rolling(tenant, name, core, rolling)
        base = core or Labelled([], [])
        return Labelled(base.texts + roll.texts, base.labels + roll.labels), doc

    def _core(self, tenant: str, name: str) -> Labelled | None:
        doc = _load(self.store.get(f"{tenant}/{name}/canary"), None)
        return None if doc is None else Labelled(doc["texts"], doc["labels"])

    def _rolling(self, tenant: str, name: str, core: Labelled | None, rolling: int) -> Labelled:
        if rolling <= 0:
            return Labelled([], [])
        fb = self.feedback(tenant, name)
        seen = {text_key(t) for t in core.texts} if core else set()
        texts, labels = [], []
        for text, label in zip(reversed(fb.texts), reversed(fb.labels)):
            if len(texts) >= rolling:
                break
            if text_key(text) not in seen:
                texts.append(text)
                labels.append(label)
        return Labelled(texts[::-1], labels[::-1])


def as_examples(items: Labelled, multi_label: bool) -> Examples:
    return Examples(list(items.texts), list(items.labels), multi_label)


def label_counts(labels: Sequence[Any]) -> dict[str, int]:
    """How often each label occurs, sorted by label; a multi-label row counts each of its labels once."""
    counts: Counter = Counter()
    for label in labels:
        counts.update(label if isinstance(label, list) else [label])
    return dict(sorted(counts.items()))


def _load(raw: bytes | None, default: Any) -> Any:
    return default if raw is None else json.loads(raw)


def _dump(doc: Any) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
