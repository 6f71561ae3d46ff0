"""Which heads must be retrained after a backbone switch, and the data to retrain them from.

Every manifest records ``parent_fingerprint``, the backbone (weights, tokenizer, pooling, backend
and precision) the head was trained on; a head refuses to load on any other. After a switch (say
torch fp32 -> ONNX int8) every classifier whose latest version, or a version an alias points at,
has another parent is *stale*. Versions saved since training data is stored carry it as
``training_data.jsonl.gz`` (see ``examples.examples_to_bytes``), so they can be refit on the new
backbone with the same data, kind and seed; older versions cannot, and are reported as such.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable

from headfleet.errors import TrainingDataError
from headfleet.heads.examples import TRAINING_DATA_FILE, Examples, examples_from_bytes, examples_to_bytes
from headfleet.heads.refs import LATEST
from headfleet.heads.registry import Registry


def training_data_files(examples: Examples) -> tuple[dict[str, bytes], dict[str, Any]]:
    """``(files, manifest entry)`` for ``Registry.save``: the stored data and what the manifest says of it."""
    blob = examples_to_bytes(examples)
    entry = {"file": TRAINING_DATA_FILE, "n_examples": len(examples), "nbytes": len(blob),
             "sha256": hashlib.sha256(blob).hexdigest()}
    return {TRAINING_DATA_FILE: blob}, entry


@dataclass
class StaleVersion:
    """A version that a classifier's ``latest`` or another alias resolves to, trained on another backbone."""

    tenant: str
    name: str
    version: int
    aliases: list[str]  # the aliases that point at it, "latest" first
    parent_fingerprint: str | None
    kind: str
    seed: int
    has_data: bool  # its training data is stored beside it (versions saved before that are not)
    manifest: dict[str, Any] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "classifier": self.name, "version": self.version, "aliases": self.aliases,
                "parent_fingerprint": self.parent_fingerprint, "kind": self.kind, "seed": self.seed,
                "labels": self.manifest.get("labels"), "has_training_data": self.has_data}


def stale_versions(registry: Registry, tenant: str, fingerprint: str,
                   names: Iterable[str] | None = None) -> list[StaleVersion]:
    """Stale aliased versions of ``tenant``'s classifiers (or of ``names``; an unknown name is
    NotFoundError), ordered by name, then version, so retraining them in order leaves ``latest``
    on the retrained latest."""
    out: list[StaleVersion] = []
    for name in (sorted(set(names)) if names is not None else [c["name"] for c in registry.list(tenant)]):
        by_version: dict[int, list[str]] = {}
        for alias, version in sorted(registry.aliases(tenant, name).items(), key=lambda a: (a[0] != LATEST, a[0])):
            by_version.setdefault(int(version), []).append(alias)
        for version in sorted(by_version):
            manifest = registry.resolve(tenant, f"{name}@{version}")
            parent = manifest.get("parent_fingerprint")
            if parent == fingerprint:
                continue
            entry = manifest.get("training_data") or {}
            has_data = bool(entry) and (registry.version_dir(tenant, manifest) / entry.get("file", "")).is_file()
            out.append(StaleVersion(tenant, name, version, by_version[version], parent,
                                    "lora" if manifest.get("adapter") else manifest.get("type", "logreg"),
                                    int((manifest.get("metrics") or {}).get("seed", 0)), has_data, manifest))
    return out


def needs_retrain(registry: Registry, tenant: str, fingerprint: str) -> dict[str, list[str]]:
    """``{classifier: [stale aliases]}`` for ``tenant``: what cannot load on the backbone ``fingerprint``."""
    out: dict[str, list[str]] = {}
    for s in stale_versions(registry, tenant, fingerprint):
        out.setdefault(s.name, []).extend(s.aliases)
    return out


def stored_examples(registry: Registry, tenant: str, manifest: dict[str, Any]) -> Examples | None:
    """The training data stored with the version ``manifest`` describes; None if it has none.

    TrainingDataError if the file is damaged or is not the data the manifest's
    ``training_data_hash`` names, so a retrain never silently fits on other data.
    """
    entry = manifest.get("training_data") or {}
    if not entry:
        return None
    path = registry.version_dir(tenant, manifest) / entry.get("file", TRAINING_DATA_FILE)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        return None
    where = f"the training data of {tenant}/{manifest['id']}"
    if entry.get("sha256") and hashlib.sha256(blob).hexdigest() != entry["sha256"]:
        raise TrainingDataError(f"{where} does not match the sha256 in its manifest (altered or damaged)")
    examples = examples_from_bytes(blob, where)
    if manifest.get("training_data_hash") and examples.source_hash != manifest["training_data_hash"]:
        raise TrainingDataError(f"{where} is not the data its manifest's training_data_hash names")
    return examples


def mark_stale(items: list[dict[str, Any]], stale: dict[str, list[str]]) -> list[dict[str, Any]]:
    """Add ``needs_retrain`` and ``stale_aliases`` to ``Registry.list`` summaries, from :func:`needs_retrain`."""
    for item in items:
        item["needs_retrain"] = item["name"] in stale
        item["stale_aliases"] = stale.get(item["name"], [])
    return items
