"""Reproduce a published version: refit it from its stored data, publish nothing, say what differs.

    manifest  = the version ``ref`` names
    examples  = its stored training data, read as it is now (its hash recomputed, not trusted)
    refit     = Engine.fit_head(kind, seed) | Engine.fit_lora(train config, seed)  # what train() runs
    now       = sha256 of the refit head's weights.safetensors bytes (HeadArrays.to_bytes: what
                Registry.save hashes; equal heads give equal bytes)
    match     = exact:     weights sha256 equal and holdout metrics equal
                tolerance: weights sha256 equal, or: each holdout metric within METRICS_ATOL and, for a
                           head on the recorded backbone, every weight within WEIGHTS_ATOL

The comparison is **exact** for a head (logreg, mlp) on the recorded backbone fingerprint whose
embeddings all come from the cache (the very vectors it was fitted on). It is a **tolerance** for
a head whose embeddings the backbone computed again (weights and metrics), for a LoRA classifier
(metrics: its adapter is fitted by a torch optimiser over backbone forwards, and a version trained
before its dropout was seeded drew other masks, which moves an update as much as the update itself),
and on another backbone (metrics: the weights live in another embedding space). The result states
which, why, and the tolerance.

``differences`` names what a mismatch can come from, each ``{"what", "name"?, "recorded", "now"}``:
``backbone`` (fingerprint, tokenizer hash, max length), ``library`` (one per package of the
recorded version maps: ``environment.numerics`` and ``library_versions``), ``environment`` (the
lock over every installed package), ``code`` (git commit), ``data`` (the training-data hash
recomputed from the stored file), ``seed``, ``settings`` (a recorded training setting this code
reads otherwise). A field a version was saved without is listed in ``unknown``, neither a match
nor a difference: it predates the field, or (``canary_hash``) it was trained outside the service,
where no canary is known.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, NamedTuple

import numpy as np

from headfleet.engine import Engine
from headfleet.engine.provenance import environment, git_commit, library_versions
from headfleet.errors import ValidationError
from headfleet.heads.adapters import CONFIG_FILE as ADAPTER_CONFIG, WEIGHTS_FILE as ADAPTER_WEIGHTS, LoraAdapter
from headfleet.heads.examples import TRAINING_DATA_FILE, Examples, examples_from_bytes
from headfleet.heads.types import HeadArrays

WEIGHTS_ATOL = 1e-4  # max |recorded - now| over a head's weights refit on recomputed embeddings
METRICS_ATOL = 0.01  # |recorded - now| per holdout metric (accuracy, macro-F1): a fraction
METRIC_KEYS = ("accuracy", "macro_f1")


def reproduce(engine: Engine, tenant: str, ref: str, *, seed: int | None = None,
              progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Refit ``tenant``'s version ``ref`` ("name@3", "name@prod") on ``engine``'s backbone; nothing is published.

    ``seed``: refit with this seed instead of the recorded one (then named as a difference).
    Returns ``{"id", "version", "kind", "comparison": "exact" | "tolerance", "why",
    "tolerance": {"weights_max_abs", "metrics_abs"} | None, "match": bool,
    "weights_sha256": {"recorded", "now", "recorded_rewritten"?}, "adapter_sha256": {"recorded", "now"} (LoRA),
    "weights_max_abs_diff": float | None (None on another backbone, or when the shapes or labels differ),
    "metrics": {"recorded": {...}, "now": {...}}, "embeddings": {"cached", "computed"} (heads),
    "canary_hash": str | None, "differences": [...], "unknown": [field, ...]}``.
    Raises NotFoundError (no such version), ValidationError (no stored training data: it was saved before
    data was kept; or data this code refuses), TrainingDataError (the stored file cannot be read at all),
    CorruptVersionError (its recorded weights do not match their sha256).
    """
    manifest = engine.registry.resolve(tenant, ref)
    examples = _stored_data(engine, tenant, manifest)
    _, recorded_head = engine.registry.load(tenant, manifest["id"])  # checks the recorded weights' sha256
    recorded = manifest.get("metrics") or {}
    unknown: list[str] = []
    recorded_seed = recorded.get("seed")
    if recorded_seed is None and manifest.get("adapter"):
        recorded_seed = (manifest["adapter"].get("train_config") or {}).get("seed")
    if recorded_seed is None:
        unknown.append("seed")
    use_seed = int(seed if seed is not None else (recorded_seed or 0))
    differences = _provenance_differences(engine, manifest, examples, unknown)
    if recorded_seed is not None and use_seed != int(recorded_seed):
        differences.append({"what": "seed", "recorded": int(recorded_seed), "now": use_seed})
    if "canary_hash" not in manifest:
        unknown.append("canary_hash")

    refit = (_refit_lora if manifest.get("adapter") else _refit_head)(engine, tenant, manifest, examples, use_seed,
                                                                      progress)
    differences += refit.differences
    same_backbone = manifest.get("parent_fingerprint") == engine.embedder.fingerprint
    out: dict[str, Any] = {"id": manifest["id"], "version": int(manifest["version"]),
                           "kind": "lora" if refit.adapter is not None else refit.head.kind,
                           "weights_sha256": _weights_sha(manifest, recorded_head, refit.head)}
    pairs = _head_pairs(recorded_head, refit.head)
    if refit.adapter is not None:
        out["adapter_sha256"] = {"recorded": manifest["adapter"].get("sha256"),
                                 "now": hashlib.sha256(refit.adapter.to_files()[ADAPTER_WEIGHTS]).hexdigest()}
        pairs = _joined(pairs, _adapter_pairs(_recorded_adapter(engine, tenant, manifest), refit.adapter))
    else:
        out["embeddings"] = refit.embeddings
    rec_m = {k: recorded[k] for k in METRIC_KEYS if recorded.get(k) is not None}
    now_m = {k: refit.metrics.get(k) for k in rec_m}
    diff = max((_max_abs(a, b) for a, b in pairs), default=0.0) if same_backbone and pairs is not None else None
    out.update(metrics={"recorded": rec_m, "now": now_m}, weights_max_abs_diff=diff)
    same_bytes = all(e["now"] in (e["recorded"], e.get("recorded_rewritten"))
                     for e in (out["weights_sha256"], out.get("adapter_sha256", out["weights_sha256"])))
    if not same_backbone:
        out.update(comparison="tolerance", tolerance={"weights_max_abs": None, "metrics_abs": METRICS_ATOL},
                   why="another backbone: the weights live in another embedding space, only the holdout "
                       "metrics are compared")
    elif refit.exact:
        out.update(comparison="exact", tolerance=None, why=refit.why)
    else:
        out.update(comparison="tolerance", why=refit.why, tolerance={
            "weights_max_abs": None if refit.adapter is not None else WEIGHTS_ATOL, "metrics_abs": METRICS_ATOL})
    out["match"] = _matches(out, same_bytes, rec_m, now_m, diff)
    out.update(canary_hash=manifest.get("canary_hash"), differences=differences, unknown=unknown)
    return out


def _matches(out: dict, same_bytes: bool, rec_m: dict, now_m: dict, diff: float | None) -> bool:
    """Exact: the same bytes and metrics; tolerance: the same bytes, or within the stated tolerance."""
    if out["comparison"] == "exact":
        return same_bytes and rec_m == now_m
    tol = out["tolerance"]
    close_metrics = all(now_m[k] is not None and abs(float(rec_m[k]) - float(now_m[k])) <= tol["metrics_abs"]
                        for k in rec_m)
    close_weights = tol["weights_max_abs"] is None or (diff is not None and diff <= tol["weights_max_abs"])
    return bool(same_bytes or (close_metrics and close_weights))


# -- the stored data -----------------------------------------------------------------------------
def _stored_data(engine: Engine, tenant: str, manifest: dict) -> Examples:
    """The stored examples as they are now; unlike ``heads.retrain.stored_examples`` a file that is no
    longer the recorded data is read anyway (the caller names the data difference)."""
    entry = manifest.get("training_data") or {}
    path = engine.registry.version_dir(tenant, manifest) / entry.get("file", TRAINING_DATA_FILE)
    if not entry or not path.is_file():
        raise ValidationError(f"{manifest['id']} has no stored training data (it was saved before data was kept), "
                              "so it cannot be reproduced; train it again from its source")
    return examples_from_bytes(path.read_bytes(), f"the training data of {tenant}/{manifest['id']}")


# -- what differs besides the weights --------------------------------------------------------------
def _provenance_differences(engine: Engine, manifest: dict, examples: Examples, unknown: list[str]) -> list[dict]:
    out: list[dict] = []

    def compare(what: str, key: str, now: Any, name: str | None = None) -> None:
        if key not in manifest:
            unknown.append(key)
        elif manifest[key] != now:
            out.append({"what": what, **({"name": name} if name else {}), "recorded": manifest[key], "now": now})

    emb = engine.embedder
    compare("backbone", "parent_fingerprint", emb.fingerprint, "fingerprint")
    compare("backbone", "tokenizer_hash", emb.tokenizer_hash, "tokenizer")
    compare("backbone", "max_length", emb.max_length, "max_length")
    compare("data", "training_data_hash", examples.source_hash)
    compare("code", "git_commit", git_commit())
    env_rec, env_now = manifest.get("environment"), environment()
    if not isinstance(env_rec, dict) or "lock" not in env_rec:
        unknown.append("environment")
    elif env_rec["lock"] != env_now["lock"]:
        out.append({"what": "environment", "recorded": env_rec["lock"], "now": env_now["lock"]})
    libs_rec = {**(manifest.get("library_versions") or {}), **((env_rec or {}).get("numerics") or {})}
    libs_now = {**library_versions(), **env_now["numerics"]}
    if not libs_rec:
        unknown.append("library_versions")
    # a version with an environment recorded every numeric package installed; an older one only its list
    names = sorted(set(libs_rec) | (set(libs_now) if isinstance(env_rec, dict) else set()))
    for name in names:
        if libs_rec.get(name) != libs_now.get(name):
            out.append({"what": "library", "name": name, "recorded": libs_rec.get(name), "now": libs_now.get(name)})
    return out


# -- refits ----------------------------------------------------------------------------------------
class Refit(NamedTuple):
    """A version fitted again, unpublished, and how its result may be compared with the recorded one."""

    head: HeadArrays
    adapter: LoraAdapter | None  # LoRA classifiers
    metrics: dict  # the refit's holdout metrics
    exact: bool  # on the recorded backbone, may the bytes be expected to be the same
    why: str  # why exact, or why a tolerance
    differences: list[dict]  # training settings recorded that this code reads otherwise
    embeddings: dict | None  # heads: {"cached", "computed"}


def _refit_head(engine: Engine, tenant: str, manifest: dict, examples: Examples, seed: int,
                progress: Callable[[int], None] | None) -> Refit:
    fit = engine.fit_head(tenant, examples, kind=manifest.get("type", "logreg"), seed=seed, progress=progress)
    recorded, now = (manifest.get("metrics") or {}).get("holdout_fraction"), fit.trained.metrics.get("holdout_fraction")
    differences = [] if recorded in (None, now) else [
        {"what": "settings", "name": "holdout_fraction", "recorded": recorded, "now": now}]
    exact = fit.batch.computed == 0
    why = ("a head, every embedding from the cache: the vectors it was fitted on" if exact else
           f"a head, {fit.batch.computed} embedding(s) computed again by the backbone")
    return Refit(fit.trained.head, None, fit.trained.metrics, exact, why, differences,
                 {"cached": sum(t is not None for t in fit.batch.tiers), "computed": fit.batch.computed})


def _refit_lora(engine: Engine, tenant: str, manifest: dict, examples: Examples, seed: int,
                progress: Callable[[int], None] | None) -> Refit:
    from headfleet.embedder.lora_train import LoraTrainConfig

    entry = manifest["adapter"]
    differences: list[dict] = []
    why = ("a LoRA classifier: its adapter is fitted by a torch optimiser over backbone forwards, and one trained "
           "before its dropout was seeded drew other masks; the holdout metrics are compared")
    if entry.get("source") == "imported":  # the adapter came from elsewhere: refit the head on it
        fit = engine.fit_lora(tenant, examples, adapter_dir=engine.registry.version_dir(tenant, manifest), seed=seed,
                              progress=progress)
        return Refit(fit.head, fit.adapter, fit.metrics, False, why, differences, None)
    recorded = dict(entry.get("train_config") or {})
    fields = {f.name for f in dataclasses.fields(LoraTrainConfig)}
    for key in sorted(set(recorded) - fields):  # a setting this code no longer reads
        differences.append({"what": "settings", "name": key, "recorded": recorded.pop(key), "now": None})
    fit = engine.fit_lora(tenant, examples, config=LoraTrainConfig(**recorded), seed=seed, progress=progress)
    return Refit(fit.head, fit.adapter, fit.metrics, False, why, differences, None)


def _recorded_adapter(engine: Engine, tenant: str, manifest: dict) -> LoraAdapter:
    import json

    weights = engine.registry.read_verified(tenant, manifest, ADAPTER_WEIGHTS, manifest["adapter"].get("sha256"))
    cfg = json.loads(engine.registry.read_verified(tenant, manifest, ADAPTER_CONFIG, None))
    return LoraAdapter.from_parts(cfg, weights, where=f"{tenant}/{manifest['id']}")


def _weights_sha(manifest: dict, recorded: HeadArrays, now: HeadArrays) -> dict[str, str | None]:
    """``{"recorded", "now"}`` sha256 of the head files; a version saved before head files were written
    byte-stably (its safetensors metadata in a random order) adds ``recorded_rewritten``: the sha256 of
    its stored arrays written as they are written now, which is what ``now`` is compared with."""
    out = {"recorded": (manifest.get("weights") or {}).get("sha256"), "now": hashlib.sha256(now.to_bytes()).hexdigest()}
    rewritten = hashlib.sha256(recorded.to_bytes()).hexdigest()
    if rewritten != out["recorded"]:
        out["recorded_rewritten"] = rewritten
    return out


def _head_pairs(a: HeadArrays, b: HeadArrays) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Corresponding weight arrays of two heads; None when they are not comparable (kind, labels, shapes)."""
    if (a.kind, a.labels, a.multi_label) != (b.kind, b.labels, b.multi_label):
        return None
    pairs = [(a.W1, b.W1), (a.b1, b.b1)] + ([(a.W2, b.W2), (a.b2, b.b2)] if a.kind == "mlp" else [])
    return pairs if all(x.shape == y.shape for x, y in pairs) else None


def _adapter_pairs(a: LoraAdapter, b: LoraAdapter) -> list[tuple[np.ndarray, np.ndarray]] | None:
    if set(a.A) != set(b.A) or any(a.A[n].shape != b.A[n].shape or a.B[n].shape != b.B[n].shape for n in a.A):
        return None
    return [(a.A[n], b.A[n]) for n in sorted(a.A)] + [(a.B[n], b.B[n]) for n in sorted(a.B)]


def _joined(*parts: list | None) -> list | None:
    return None if any(p is None for p in parts) else [x for p in parts for x in p]


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
