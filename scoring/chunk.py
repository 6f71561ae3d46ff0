"""One chunk of a store through ``classify``: the unit a job scores, writes as a part and commits.

The guarantee: a chunk is the same rows in every run, and its scored form lines up result for
result with its good rows, with the classifier versions the job was pinned to. How it is kept:

    cut:     rows [k*n, (k+1)*n) of file f are chunk (f, k), bad rows included; a run resumes at
             the cursor (f0, c0): file f0 from row c0*n, the files after it from 0 (file_starts)
    pin:     each classifier ref as asked -> name@version once, when the job starts (a resumed job
             keeps the pins its checkpoint holds)
    score:   the good rows' texts -> classify(tenant, texts, [pinned refs], namespace=...);
             results must number the good rows (RuntimeError otherwise), bad rows go to rejects
             with their file and row

The job's local engine (:func:`score_rows`) and the Ray actors (:func:`classify_good` there,
:func:`scored_chunk` on the driver) share these calls, so both engines write the same parts.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Sequence

Classify = Callable[..., dict]  # (tenant, texts, classifiers, namespace=None) -> Engine.classify's answer
Resolve = Callable[[str, str], dict]  # (tenant, ref) -> the version's manifest


@dataclasses.dataclass
class ScoredChunk:
    """One chunk after classify: what its part holds and what its counts add."""

    key: tuple[int, int]  # (file index, chunk index)
    ids: list
    truncated: list[bool]
    results: dict[str, dict[str, list]]  # output column -> {"label": [...], "score": [...], "version": [...]}
    #                                      (multi-label: "labels", "scores", "version"), one entry per document
    rejects: list[dict]
    tiers: list[str]  # per scored document: memory | local | redis | miss | partial (counted apart)
    computed: int  # embeddings the backbone computed for this chunk
    forwards: int | None  # backbone forward passes, when the caller could count them


def file_starts(cursor: tuple[int, int], n_files: int, chunk_rows: int) -> Iterator[tuple[int, int]]:
    """``(file index, first row position)`` for every file from the cursor ``(file, chunk)`` on: the
    cursor's file from its chunk's first row, every later file from row 0."""
    f0, c0 = cursor
    for fi in range(f0, n_files):
        yield fi, (c0 * chunk_rows if fi == f0 else 0)


def pin(resolve: Resolve, tenant: str, refs: Sequence[str]) -> dict[str, dict]:
    """Each ref as asked -> the version it names now; a resumed job keeps these.

    Returns ``{ref: {"ref": "name@version", "name", "version": int, "multi_label": bool, "labels": [...]}}``;
    ``resolve``'s errors (an unknown classifier) propagate."""
    pins = {}
    for ref in refs:
        m = resolve(tenant, ref)
        pins[ref] = {"ref": f"{m['name']}@{m['version']}", "name": m["name"], "version": int(m["version"]),
                     "multi_label": bool(m.get("multi_label", False)), "labels": list(m.get("labels", []))}
    return pins


def _columns(pins: dict[str, dict]) -> dict[str, dict[str, list]]:
    return {c: ({"labels": [], "scores": [], "version": []} if p["multi_label"] else
                {"label": [], "score": [], "version": []}) for c, p in pins.items()}


def _append(cols: dict[str, list], entry: dict) -> None:
    """Engine.classify's per-classifier entry -> the output's ``label, score, version`` columns."""
    if "labels" in cols:
        cols["labels"].append(entry["labels"])
        cols["scores"].append([entry["scores"][lab] for lab in entry["labels"]])
    else:
        cols["label"].append(entry["label"])
        cols["score"].append(entry["scores"][entry["label"]])
    cols["version"].append(entry["version"])


def classify_good(classify: Classify, tenant: str, pins: dict[str, dict], texts: list[str], *,
                  namespace: str | None = None, forwards: Callable[[], int] | None = None) -> tuple[list, int, int | None]:
    """``texts`` through ``classify`` with every pinned version: (per-text results, embeddings computed,
    backbone forwards run or None). ``forwards``: a counter read before and after (None: not counted)."""
    if not texts:
        return [], 0, (0 if forwards is not None else None)
    refs = list(dict.fromkeys(p["ref"] for p in pins.values()))
    before = forwards() if forwards is not None else None
    kwargs = {"namespace": namespace} if namespace is not None else {}
    out = classify(tenant, texts, refs, **kwargs)
    n_forwards = forwards() - before if before is not None else None
    return out["results"], int(out["cache"]["computed"]), n_forwards


def scored_chunk(key: tuple[int, int], rows: list, results: list, computed: int, forwards: int | None,
                 pins: dict[str, dict], file_label: str) -> ScoredChunk:
    """Rows ``(pos, id, text, reject)`` and ``classify``'s results for the good ones, in order -> a ScoredChunk.
    Raises ``RuntimeError`` when the results do not number the good rows."""
    good_ids = [r[1] for r in rows if r[3] is None]
    if len(good_ids) != len(results):
        raise RuntimeError(f"{len(results)} results for {len(good_ids)} documents in chunk {key}")
    rejects = [{"file": file_label, "row": r[0], **r[3]} for r in rows if r[3] is not None]
    cols = _columns(pins)
    truncated, tiers = [], []
    for res in results:
        per = res["classifications"]
        for c, p in pins.items():
            _append(cols[c], per[p["ref"]])
        truncated.append(bool(res["truncated"]))
        tiers.append(res["cache"])
    return ScoredChunk(key, good_ids, truncated, cols, rejects, tiers, computed, forwards)


def score_rows(classify: Classify, tenant: str, pins: dict[str, dict], rows: list, *, key: tuple[int, int],
               file_label: str, namespace: str | None = None, forwards: Callable[[], int] | None = None) -> ScoredChunk:
    """Rows ``(pos, id, text, reject)`` -> a ScoredChunk: good rows through ``classify``, bad ones to rejects."""
    results, computed, n_forwards = classify_good(classify, tenant, pins, [r[2] for r in rows if r[3] is None],
                                                  namespace=namespace, forwards=forwards)
    return scored_chunk(key, rows, results, computed, n_forwards, pins, file_label)
