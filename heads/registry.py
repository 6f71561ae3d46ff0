"""A versioned, per-tenant store of heads in a data folder.

Layout:
    root/<tenant>/<name>/versions/<N>/manifest.json       what the head is and where it came from
    root/<tenant>/<name>/versions/<N>/weights.safetensors the arrays
    root/<tenant>/<name>/aliases.json                     {"latest": N, "prod": M, ...}
    root/<tenant>/<name>/.aliases.lock                    flock target for alias updates

Guarantees and how they are kept:
- A version appears complete or not at all: it is written into a hidden temp dir inside the
  classifier dir (same filesystem) and published with one ``os.rename`` to ``versions/N``.
  ``rename`` onto an existing non-empty directory fails, so two writers can never both get N;
  the loser retries with N+1. No lock is needed for allocation.
- Versions are immutable: nothing in this module writes into ``versions/N`` after the rename.
- Alias updates are read-modify-write under an flock, published with ``os.replace``. After a
  save, "latest" points at the highest version saved (max, so concurrent savers finishing out
  of order cannot move it backwards).
- Tenants are isolated by path only: a lookup reads ``root/<tenant>/...`` and nothing else, so
  another tenant's classifier is indistinguishable from a missing one, message included.
- Delete renames the classifier dir to a hidden trash name (one atomic step, after which every
  lookup is NotFound), then removes the trash.
- A version's files are what was published: the manifest records the sha256 of the weights
  (and of a LoRA adapter's weights); :meth:`Registry.load` hashes the very bytes it parses and
  refuses a mismatch, a truncated or unreadable file with ``CorruptVersionError`` naming
  ``tenant/name@version`` and the way out (retrain, restore, or move the alias).
- Leftovers of crashed writers are swept by :meth:`Registry.sweep` (the service calls it at
  start): a writer holds an ``flock`` on its ``.tmp-*`` dir for the whole save, so a temp dir whose
  lock can be taken belongs to a dead process; ``.trash-*`` dirs are always garbage.
Hidden entries (leading '.') are the registry's own and can never collide with valid names.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from headfleet.errors import ConflictError, CorruptVersionError, NotFoundError, ParentMismatchError, ValidationError
from headfleet.atomic import dump_json, fsync_dir, locked, write_json_atomic
from headfleet.heads.refs import LATEST, Ref, parse_ref
from headfleet.names import NAME_RE, check_alias, check_name
from headfleet.heads.types import WEIGHTS_FILE, HeadArrays

MANIFEST_FILE = "manifest.json"
ALIASES_FILE = "aliases.json"
BACKBONE_ALIASES_FILE = "backbone_aliases.json"  # {backbone fingerprint: {alias: version}}: a backbone upgrade's
LOCK_FILE = ".aliases.lock"
VERSIONS_DIR = "versions"
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
#: What a listing shows of a LoRA version's ``adapter`` manifest entry (the entry holds more:
#: sha256, bytes, scale, training settings; ``resolve`` returns all of it).
ADAPTER_SUMMARY = ("format", "source", "rank", "alpha", "targets")


class Registry:
    """Versioned heads under ``root``; safe for concurrent writers in several processes."""

    def __init__(self, root: Path | str, fingerprint: str | None = None):
        """``fingerprint``: the backbone this registry's reader serves. Its backbone aliases (written
        by ``headfleet backbone apply``) win over the plain ones for it, so an engine on the new
        backbone resolves ``latest`` to the refit version while one on the old backbone still
        resolves it to the version it was serving: both serve at once, nothing breaks in between."""
        self.root = Path(root)
        self.fingerprint = fingerprint

    # --- writing ------------------------------------------------------------------------------
    def save(self, tenant: str, name: str, head: HeadArrays, manifest: dict[str, Any] | None = None,
             files: dict[str, bytes] | None = None, alias: str | None = LATEST) -> dict[str, Any]:
        """Store ``head`` as the next version of ``tenant/name`` and point ``alias`` at it.

        ``alias`` is "latest" for an ordinary save. Another alias (a monitor's retrain publishes
        with "candidate") moves that alias only: "latest", and so every bare-name request, keeps
        the version it had (a classifier's first version becomes "latest" whatever ``alias`` says).
        None moves no alias (a backbone upgrade's refit, aliased per backbone afterwards).

        ``files``: further artefacts of the version (a LoRA adapter, the training data), written
        into the same temp dir and published by the same rename, so they appear with the head or
        not at all; names are plain file names, never the head's or the manifest's.

        ``manifest`` carries the caller's provenance (parent_fingerprint, tokenizer_hash,
        training_data_hash, metrics, validation, library versions, git_commit, ...); the
        registry's own fields (id, tenant, name, version, type, labels, multi_label, created_at,
        weights) are set here and win over same-named caller fields. Returns the full manifest.
        """
        cdir = self._classifier_dir(tenant, name)
        versions = cdir / VERSIONS_DIR
        versions.mkdir(parents=True, exist_ok=True)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=cdir))
        except FileNotFoundError:
            raise ConflictError(f"classifier {name!r} was deleted while saving; save again") from None
        held = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(held, fcntl.LOCK_EX)  # "a live writer owns this dir" (see sweep); released on close
        try:
            head.save(tmp)
            for fname, data in (files or {}).items():
                if fname in (WEIGHTS_FILE, MANIFEST_FILE) or os.path.basename(fname) != fname or fname.startswith("."):
                    raise ValueError(f"registry file name {fname!r} is reserved or not a plain name")
                with open(tmp / fname, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            weights_sha = _sha256(tmp / WEIGHTS_FILE)
            version = _next_version(versions)
            while True:
                full = {
                    **(manifest or {}),
                    "id": f"{name}@{version}",
                    "tenant": tenant,
                    "name": name,
                    "version": version,
                    "type": head.kind,
                    "labels": list(head.labels),
                    "multi_label": head.multi_label,
                    "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "weights": {"file": WEIGHTS_FILE, "sha256": weights_sha, "nbytes": head.nbytes},
                }
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp / MANIFEST_FILE)
                dump_json(tmp / MANIFEST_FILE, full)
                os.chmod(tmp, 0o755)  # mkdtemp makes 0700; a published version is world-readable
                try:
                    os.rename(tmp, versions / str(version))
                    break
                except OSError as e:
                    if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
                    version = max(version + 1, _next_version(versions))  # a concurrent writer won N
        except FileNotFoundError:
            shutil.rmtree(tmp, ignore_errors=True)
            _prune_if_empty(cdir)
            raise ConflictError(f"classifier {name!r} was deleted while saving; save again") from None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            os.close(held)
        with contextlib.suppress(FileNotFoundError):  # deleted right after publishing: nothing to persist
            fsync_dir(versions)
        def point(aliases: dict[str, int]) -> None:
            if alias == LATEST or LATEST not in aliases:
                aliases[LATEST] = max(int(aliases.get(LATEST, 0)), version)
            if alias is not None and alias != LATEST:
                aliases[check_alias(alias)] = version

        self._update_aliases(cdir, name, point)
        return full

    def set_alias(self, tenant: str, name: str, alias: str, version: int) -> dict[str, int]:
        """Point ``alias`` at an existing ``version``; returns all aliases afterwards."""
        check_alias(alias)
        cdir = self._existing_dir(tenant, name)
        version = int(version)
        if version not in self._versions_of(cdir):
            raise NotFoundError(f"classifier {name!r} has no version {version}")
        return self._update_aliases(cdir, name, lambda a: a.__setitem__(alias, version))

    def delete(self, tenant: str, name: str) -> None:
        """Remove a classifier with all its versions; lookups fail from the rename on."""
        cdir = self._existing_dir(tenant, name)
        trash = cdir.parent / f"{_TRASH_PREFIX}{name}-{uuid.uuid4().hex}"
        try:
            os.rename(cdir, trash)
        except FileNotFoundError:
            raise NotFoundError(_missing(name)) from None
        shutil.rmtree(trash, ignore_errors=True)

    # --- reading ------------------------------------------------------------------------------
    def resolve(self, tenant: str, ref: str) -> dict[str, Any]:
        """The manifest that ``ref`` ("name", "name@3", "name@prod") names for ``tenant``."""
        parsed = parse_ref(ref)
        cdir = self._existing_dir(tenant, parsed.name)
        version = self._version_for(cdir, parsed)
        try:
            with open(self._version_dir(cdir, version) / MANIFEST_FILE, encoding="utf-8") as f:
                manifest = json.load(f)
        except FileNotFoundError:
            raise NotFoundError(f"classifier {parsed.name!r} has no version {version}") from None
        except (OSError, ValueError) as exc:  # torn by hand, bad bytes, not JSON
            raise CorruptVersionError(corrupt_message(tenant, parsed.name, version, f"its manifest cannot be read "
                                                      f"({type(exc).__name__})")) from None
        if not isinstance(manifest, dict) or manifest.get("version") != version:
            raise CorruptVersionError(corrupt_message(tenant, parsed.name, version,
                                                      "its manifest is not the one published for it"))
        return manifest

    def load(self, tenant: str, ref: str, expected_fingerprint: str | None = None) -> tuple[dict[str, Any], HeadArrays]:
        """Manifest and head for ``ref``; refuses a head trained on another backbone."""
        manifest = self.resolve(tenant, ref)
        parent = manifest.get("parent_fingerprint")
        if expected_fingerprint is not None and parent != expected_fingerprint:
            raise ParentMismatchError(
                f"classifier {manifest['id']!r} was trained on backbone "
                f"{str(parent)[:12] if parent else 'unknown'} but the loaded backbone is "
                f"{expected_fingerprint[:12]}; the head must be retrained on this backbone"
            )
        name, version = manifest["name"], int(manifest["version"])
        data = self.read_verified(tenant, manifest, WEIGHTS_FILE, (manifest.get("weights") or {}).get("sha256"))
        try:
            head = HeadArrays.from_bytes(data, where=WEIGHTS_FILE)
        except ValidationError as exc:
            raise CorruptVersionError(corrupt_message(tenant, name, version, exc.message)) from None
        return manifest, head

    def read_verified(self, tenant: str, manifest: dict[str, Any], fname: str, sha256: str | None) -> bytes:
        """The bytes of the version's file ``fname``, checked against ``sha256`` (hex) when one is
        recorded. Raises NotFoundError when the classifier was deleted meanwhile, and
        CorruptVersionError when the file is missing from an existing version or does not match."""
        name, version = manifest["name"], int(manifest["version"])
        vdir = self._version_dir(self._classifier_dir(tenant, name), version)
        try:
            data = (vdir / fname).read_bytes()
        except FileNotFoundError:
            if not vdir.is_dir():  # deleted between resolve and load
                raise NotFoundError(_missing(name)) from None
            raise CorruptVersionError(corrupt_message(tenant, name, version, f"{fname} is missing")) from None
        except OSError as exc:
            raise CorruptVersionError(corrupt_message(tenant, name, version, f"{fname} cannot be read "
                                                      f"({type(exc).__name__})")) from None
        if sha256 and hashlib.sha256(data).hexdigest() != sha256:
            raise CorruptVersionError(corrupt_message(tenant, name, version, f"{fname} does not match the sha256 "
                                                      "its manifest records (changed or truncated after publishing)"))
        return data

    def sweep(self, min_age_s: float = 2.0) -> int:
        """Remove what crashed writers left: ``.tmp-*`` version dirs whose writer is gone (its flock
        can be taken) and older than ``min_age_s`` seconds, ``.trash-*`` dirs of interrupted deletes,
        and stray alias temp files. Safe beside live writers in other processes. Returns how many."""
        from headfleet.heads.registry_sweep import sweep

        return sweep(self.root, min_age_s)

    def version_dir(self, tenant: str, manifest: dict[str, Any]) -> Path:
        """The folder of the version ``manifest`` describes (read-only: versions are immutable)."""
        return self._version_dir(self._classifier_dir(tenant, manifest["name"]), int(manifest["version"]))

    def versions(self, tenant: str, name: str) -> list[int]:
        return self._versions_of(self._existing_dir(tenant, name))

    def set_backbone_aliases(self, tenant: str, name: str, fingerprint: str, aliases: dict[str, int]) -> None:
        """Point ``aliases`` at versions for readers on the backbone ``fingerprint`` only (replacing
        what that backbone had); plain aliases are untouched. A later plain move of an alias (a
        save, ``set_alias``) removes it here, for every backbone: the newest decision wins."""
        cdir = self._existing_dir(tenant, name)
        have = set(self._versions_of(cdir))
        for alias, v in aliases.items():
            check_alias(alias)
            if int(v) not in have:
                raise NotFoundError(f"classifier {name!r} has no version {v}")
        with locked(cdir / LOCK_FILE):
            doc = _read_backbone_aliases(cdir)
            doc[fingerprint] = {a: int(v) for a, v in aliases.items()}
            write_json_atomic(cdir / BACKBONE_ALIASES_FILE, doc)

    def backbone_aliases(self, tenant: str, name: str) -> dict[str, dict[str, int]]:
        """Every backbone's own aliases of ``name``: ``{fingerprint: {alias: version}}``."""
        return _read_backbone_aliases(self._existing_dir(tenant, name))

    def _effective(self, cdir: Path) -> dict[str, int]:
        aliases = _read_aliases(cdir)
        if self.fingerprint is not None:
            aliases.update(_read_backbone_aliases(cdir).get(self.fingerprint, {}))
        return aliases

    def aliases(self, tenant: str, name: str) -> dict[str, int]:
        """The aliases as this registry's backbone sees them (its backbone aliases over the plain ones)."""
        cdir = self._existing_dir(tenant, name)
        aliases = self._effective(cdir)
        if LATEST not in aliases:  # a saver died between publishing and aliasing
            aliases[LATEST] = self._versions_of(cdir)[-1]
        return aliases

    def list(self, tenant: str) -> list[dict[str, Any]]:
        """One summary per classifier of ``tenant`` (none for an unknown tenant): ``name``, ``id``,
        ``latest``, ``versions``, ``aliases``, ``labels``, ``multi_label``, ``type`` (the head's kind),
        ``created_at``, and ``adapter``: None for a head on the shared embedding, for a LoRA
        classifier ``{format, source, rank, alpha, targets}`` of its adapter; all of the latest version."""
        tdir = self.root / check_name(tenant, "tenant")
        out: list[dict[str, Any]] = []
        if not tdir.is_dir():
            return out
        for entry in sorted(tdir.iterdir()):
            if not NAME_RE.match(entry.name) or not entry.is_dir():  # hidden temp/trash, strays
                continue
            try:
                versions = self.versions(tenant, entry.name)
                aliases = self.aliases(tenant, entry.name)
                latest = self.resolve(tenant, f"{entry.name}@{aliases[LATEST]}")
            except NotFoundError:  # deleted meanwhile, or a save still in flight
                continue
            out.append({
                "name": entry.name,
                "id": latest["id"],
                "latest": latest["version"],
                "versions": versions,
                "aliases": aliases,
                "labels": latest["labels"],
                "multi_label": latest["multi_label"],
                "type": latest["type"],
                "created_at": latest.get("created_at"),
                "adapter": _adapter_summary(latest),
            })
        return out

    def tenants(self) -> list[str]:
        """Every tenant with a folder under the root (an operator's view, e.g. for a fleet-wide retrain)."""
        if not self.root.is_dir():
            return []
        return sorted(e.name for e in self.root.iterdir() if NAME_RE.match(e.name) and e.is_dir())

    # --- helpers ------------------------------------------------------------------------------
    def _classifier_dir(self, tenant: str, name: str) -> Path:
        return self.root / check_name(tenant, "tenant") / check_name(name, "classifier name")

    def _existing_dir(self, tenant: str, name: str) -> Path:
        """The classifier dir, or NotFoundError that reads the same whoever else owns ``name``."""
        cdir = self._classifier_dir(tenant, name)
        if not self._versions_of_or_empty(cdir):
            raise NotFoundError(_missing(name))
        return cdir

    @staticmethod
    def _version_dir(cdir: Path, version: int) -> Path:
        return cdir / VERSIONS_DIR / str(version)

    def _versions_of(self, cdir: Path) -> list[int]:
        versions = self._versions_of_or_empty(cdir)
        if not versions:
            raise NotFoundError(_missing(cdir.name))
        return versions

    @staticmethod
    def _versions_of_or_empty(cdir: Path) -> list[int]:
        try:
            names = os.listdir(cdir / VERSIONS_DIR)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(int(n) for n in names if n.isdigit())

    def _version_for(self, cdir: Path, ref: Ref) -> int:
        if ref.version is not None:
            return ref.version
        aliases = self._effective(cdir)
        if ref.alias in aliases:
            return int(aliases[ref.alias])
        if ref.alias == LATEST:
            return self._versions_of(cdir)[-1]
        raise NotFoundError(f"classifier {ref.name!r} has no alias {ref.alias!r}")

    @staticmethod
    def _update_aliases(cdir: Path, name: str, change: Any) -> dict[str, int]:
        try:
            with locked(cdir / LOCK_FILE):
                aliases = _read_aliases(cdir)
                before = dict(aliases)
                change(aliases)
                write_json_atomic(cdir / ALIASES_FILE, aliases)
                moved = {a for a, v in aliases.items() if before.get(a) != v}
                scoped = _read_backbone_aliases(cdir)
                if moved and any(moved & set(m) for m in scoped.values()):  # the newest decision wins
                    write_json_atomic(cdir / BACKBONE_ALIASES_FILE, {
                        fp: {a: v for a, v in m.items() if a not in moved} for fp, m in scoped.items()})
        except FileNotFoundError:
            raise NotFoundError(_missing(name)) from None
        return aliases


def corrupt_message(tenant: str, name: str, version: int, what: str) -> str:
    """The one wording of a corrupt version: which, what is wrong, what to do (no server paths)."""
    return (f"classifier version {tenant}/{name}@{version} is corrupt: {what}. It is not served; retrain it "
            f"(a new version), restore its folder from a backup, or point the alias at another version; "
            "other classifiers are unaffected")


def _adapter_summary(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The listing's view of a LoRA version's adapter (``ADAPTER_SUMMARY``), or None without one."""
    entry = manifest.get("adapter")
    if not entry:
        return None
    return {k: entry.get(k) for k in ADAPTER_SUMMARY}


def _missing(name: str) -> str:
    # One message whether the classifier never existed or belongs to another tenant.
    return f"no classifier named {name!r}"


def _read_aliases(cdir: Path) -> dict[str, int]:
    try:
        with open(cdir / ALIASES_FILE, encoding="utf-8") as f:
            return {k: int(v) for k, v in json.load(f).items()}
    except FileNotFoundError:
        return {}


def _read_backbone_aliases(cdir: Path) -> dict[str, dict[str, int]]:
    try:
        with open(cdir / BACKBONE_ALIASES_FILE, encoding="utf-8") as f:
            return {fp: {a: int(v) for a, v in m.items()} for fp, m in json.load(f).items()}
    except FileNotFoundError:
        return {}


def _next_version(versions: Path) -> int:
    existing = [int(n) for n in os.listdir(versions) if n.isdigit()]
    return max(existing, default=0) + 1


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _prune_if_empty(cdir: Path) -> None:
    """After losing a race with delete, remove a classifier dir our own writes re-created."""
    for path in (cdir / VERSIONS_DIR, cdir):
        with contextlib.suppress(OSError):
            os.rmdir(path)
