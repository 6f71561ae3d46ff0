"""Training and retraining: validate, embed through the cache, fit, publish an immutable version
(heads and LoRA adapters alike), refit stale versions on the loaded backbone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from typing import Any, Callable, NamedTuple, Sequence

from headfleet.cache import normalise_text
from headfleet.embedder.lora_names import target_name
from headfleet.errors import ValidationError
from headfleet.heads.adapters import LoraAdapter
from headfleet.heads import Examples, HeadArrays, TokenStats, TrainedHead, ValidationReport, train_head, validate
from headfleet.names import check_name
from headfleet.heads.refs import CANDIDATE, LATEST
from headfleet.heads.retrain import stale_versions, stored_examples, training_data_files
from headfleet.engine.provenance import environment, git_commit, library_versions
from headfleet.engine.types import EmbedBatch

log = logging.getLogger(__name__)


class HeadFit(NamedTuple):
    """A head fitted on frozen embeddings, not yet published (:meth:`TrainingMixin.fit_head`)."""

    trained: TrainedHead  # the shipped head (refit on every example), holdout metrics, data report
    batch: EmbedBatch  # the embeddings it was fitted on, and which cache tier answered each


class LoraFit(NamedTuple):
    """A LoRA classifier fitted, not yet published (:meth:`TrainingMixin.fit_lora`)."""

    adapter: LoraAdapter
    head: HeadArrays  # logreg on the adapted embedding
    metrics: dict  # holdout figures (embedder.lora_train, or heads.train for an imported adapter) and "seed"
    report: ValidationReport
    source: str  # "trained" | "imported"
    train_config: dict | None  # the LoraTrainConfig as a dict ("trained" only)
    seconds: float


class TrainingMixin:
    def train(self, tenant: str, name: str, examples: Examples, *, kind: str = "logreg", seed: int = 0,
              progress: Callable[[int], None] | None = None,
              embed: Callable[..., EmbedBatch] | None = None, provenance: dict | None = None,
              candidate: bool = False, review: Callable[[Any], dict] | None = None,
              move_alias: bool = True) -> dict:
        """Validate, embed through the cache, fit, save a new immutable version; returns its manifest.

        ``move_alias=False``: publish without moving any alias (a backbone upgrade aliases the new
        version for its backbone only: ``Registry.set_backbone_aliases``).

        ``candidate``: publish without moving "latest" (bare-name requests keep the live version)
        and move the "candidate" alias to the new version instead. ``review(head) -> dict``: called
        with the fitted head before it is published; its fields join the manifest (head kinds
        only; a LoRA classifier with ``review`` is a ValidationError).

        ``embed(tenant, texts, progress=...)`` replaces :meth:`embed` (the service passes one
        that goes through its scheduler, so training shares the backbone fairly). The examples
        are stored with the version (``training_data.jsonl.gz``), so :meth:`retrain` can refit it
        on another backbone; ``provenance``: further manifest fields (e.g. ``retrained_from``).
        """
        if kind == "lora":
            if candidate or review is not None or not move_alias:
                raise ValidationError("LoRA classifiers are not published as reviewed candidates")
            return self.train_lora(tenant, name, examples, seed=seed, progress=progress, embed=embed,
                                   provenance=provenance)
        check_name(name, "classifier name")
        trained, batch = self.fit_head(tenant, examples, kind=kind, seed=seed, progress=progress, embed=embed)
        extra = {"training_cache": batch.cache_report(), **(provenance or {}),
                 **(review(trained.head) if review is not None else {})}
        return self._publish(tenant, name, trained.head, examples, metrics=trained.metrics, report=trained.report,
                             extra=extra, alias=(CANDIDATE if candidate else LATEST) if move_alias else None)

    def fit_head(self, tenant: str, examples: Examples, *, kind: str = "logreg", seed: int = 0,
                 progress: Callable[[int], None] | None = None,
                 embed: Callable[..., EmbedBatch] | None = None) -> HeadFit:
        """What :meth:`train` fits, without publishing: validate (ValidationError for unusable data),
        embed through the tenant's cache namespace, fit ``kind`` with ``seed`` on a stratified holdout
        (the metrics), then refit on every example (the head). ``lifecycle.reproduce`` refits a
        version with exactly this."""
        report = self._validate(examples)
        batch = (embed or self.embed)(tenant, examples.texts, progress=progress)
        return HeadFit(train_head(batch.vectors, examples, kind=kind, seed=seed, report=report, refit=True), batch)

    def retrain(self, tenant: str, names: Sequence[str] | None = None, *, dry_run: bool = False,
                progress: Callable[[int], None] | None = None,
                embed: Callable[..., EmbedBatch] | None = None) -> list[dict]:
        """Refit every stale classifier of ``tenant`` (or of ``names``) on this engine's backbone.

        Stale: its latest version, or a version an alias points at, was trained on another
        backbone (after a backend or precision switch, say), so it refuses to load. Each such
        version is refit from its stored training data with the same kind and seed and saved as
        a new version; its aliases move to it (``latest`` stays on the newest data). One entry per
        stale version: ``status`` "retrained" (with ``new_version`` and holdout metrics before and
        after), "would_retrain" (``dry_run``: the stored data was read and checked),
        "no_training_data" (saved before training data was stored: train it again from the source)
        or "bad_training_data" (the stored file is damaged or not the recorded data; ``error`` says).
        """
        from headfleet.errors import TrainingDataError
        from headfleet.heads.refs import LATEST

        out = []
        for stale in stale_versions(self.registry, tenant, self.embedder.fingerprint, names):
            entry = stale.to_dict()
            try:
                examples = stored_examples(self.registry, tenant, stale.manifest) if stale.has_data else None
            except TrainingDataError as exc:
                out.append({**entry, "status": "bad_training_data", "error": exc.message})
                continue
            if examples is None:
                out.append({**entry, "status": "no_training_data"})
                continue
            entry["n_examples"] = len(examples)
            if dry_run:
                out.append({**entry, "status": "would_retrain"})
                continue
            latest_before = self.registry.aliases(tenant, stale.name)[LATEST]
            provenance = {"retrained_from": {"version": stale.version, "parent_fingerprint": stale.parent_fingerprint}}
            if stale.manifest.get("adapter"):  # LoRA: trained again with the recorded settings (rank, alpha, ...)
                config = recorded_lora_config(stale.manifest)
                manifest = self.train_lora(tenant, stale.name, examples, config=config, seed=stale.seed,
                                           progress=progress, embed=embed, provenance=provenance)
                entry["lora_config"] = "recorded" if config is not None else "default (the adapter was imported)"
            else:
                manifest = self.train(tenant, stale.name, examples, kind=stale.kind, seed=stale.seed,
                                      progress=progress, embed=embed, provenance=provenance)
            new = int(manifest["version"])
            for alias in stale.aliases:
                if alias != LATEST:
                    self.registry.set_alias(tenant, stale.name, alias, new)
            if LATEST not in stale.aliases and self.registry.aliases(tenant, stale.name)[LATEST] == new:
                self.registry.set_alias(tenant, stale.name, LATEST, latest_before)  # latest was not stale
            self._unload_unaliased(tenant, stale.name)
            before, after = stale.manifest.get("metrics") or {}, manifest["metrics"]
            out.append({**entry, "status": "retrained", "new_version": new, "new_id": manifest["id"],
                        "new_parent_fingerprint": self.embedder.fingerprint,
                        # LoRA versions saved before "accuracy" was recorded name it holdout_accuracy
                        "accuracy": {"before": before.get("accuracy", before.get("holdout_accuracy")),
                                     "after": after.get("accuracy")},
                        "macro_f1": {"before": before.get("macro_f1"), "after": after.get("macro_f1")}})
        return out


    # -- LoRA classifiers ---------------------------------------------------------------------
    def train_lora(self, tenant: str, name: str, examples: Examples, *, config=None, adapter_dir=None,
                   seed: int = 0, progress: Callable[[int], None] | None = None,
                   embed: Callable[..., EmbedBatch] | None = None, provenance: dict | None = None) -> dict:
        """A LoRA classifier: an adapter on the frozen backbone plus a head on the adapted embedding.

        Without ``adapter_dir`` an adapter is trained here (``embedder.lora_train``: the head starts
        from a head fitted on the frozen embeddings of the train split, the adapter from a zero
        delta; AdamW, warm-up, early stopping on a holdout, best epoch kept; the holdout is
        ``heads.split.per_class_holdout`` with ``config.holdout`` and ``config.seed``). With
        ``adapter_dir`` a PEFT adapter trained elsewhere on this base model is imported and a head
        is fitted on the embeddings it gives. Only the adapter (PEFT format) and the head are saved,
        with the training data, under a manifest naming the parent backbone's fingerprint.
        """
        check_name(name, "classifier name")
        fit = self.fit_lora(tenant, examples, config=config, adapter_dir=adapter_dir, seed=seed, progress=progress,
                            embed=embed)
        return self.save_lora(tenant, name, fit.adapter, fit.head, examples, metrics=fit.metrics, report=fit.report,
                              source=fit.source, train_config=fit.train_config, seconds=fit.seconds,
                              provenance=provenance)

    def fit_lora(self, tenant: str, examples: Examples, *, config=None, adapter_dir=None, seed: int = 0,
                 progress: Callable[[int], None] | None = None,
                 embed: Callable[..., EmbedBatch] | None = None) -> LoraFit:
        """What :meth:`train_lora` fits, without publishing (same arguments, same errors); the
        metrics record ``seed`` (the frozen head's), the train config its own."""
        import torch

        from headfleet.embedder.lora_train import LoraTrainConfig, train_lora
        from headfleet.heads.split import per_class_holdout
        from headfleet.heads.examples import Examples as _Examples

        report = self._validate(examples)
        manager = self.adapter_manager()
        from headfleet.embedder.lora import module_shapes  # torch: imported only where LoRA is used

        shapes = module_shapes(self.embedder.torch_model())
        t0 = time.perf_counter()
        if adapter_dir is not None:
            adapter = LoraAdapter.from_folder(adapter_dir, shapes=shapes, base_names=self._base_names())
            if adapter.rank > manager.bank.max_rank:
                raise ValidationError(f"adapter rank {adapter.rank} exceeds HEADFLEET_LORA_MAX_RANK="
                                      f"{manager.bank.max_rank}")
            missing = {n for n in adapter.A} - set(manager.bank.layers)
            if missing:
                raise ValidationError(f"the adapter changes {sorted(missing)[0]!r}, which this service does not "
                                      f"adapt (HEADFLEET_LORA_TARGETS={self.settings.lora_targets})")
            vectors = self._embed_with(adapter, examples.texts, progress)
            trained = train_head(vectors, examples, kind="logreg", seed=seed, report=report, refit=True)
            head, metrics, source, cfg = trained.head, trained.metrics, "imported", None
        else:
            cfg = config or LoraTrainConfig(seed=seed)
            frozen = (embed or self.embed)(tenant, examples.texts, progress=None).vectors
            classes, y = examples.classes(), examples.targets()
            keep, holdout = per_class_holdout(y, examples.multi_label, cfg.holdout, cfg.seed)
            sub = _Examples([examples.texts[i] for i in keep], [examples.labels[i] for i in keep], examples.multi_label)
            init = train_head(frozen[keep], sub, kind="logreg", seed=seed, holdout=0.0).head
            if init.labels != classes:
                raise ValidationError("a class occurs only in the holdout; add examples of every class")
            steps = progress and (lambda step, total: progress(1))
            # the adapter's dropout draws from torch's global generator: seeded here (inside a forked
            # state, so the caller's draws are untouched), a refit with the same seed draws the same masks
            with torch.random.fork_rng():
                torch.manual_seed(cfg.seed)
                out = train_lora(self.embedder, examples.texts, y, multi_label=examples.multi_label,
                                 head_init=(init.W1, init.b1), config=cfg, holdout_idx=holdout, progress=steps)
            adapter = LoraAdapter(rank=cfg.rank, alpha=cfg.alpha, use_rslora=cfg.use_rslora,
                                  targets=sorted({target_name(n) for n in out.A}), A=out.A, B=out.B,
                                  base_model=self._base_names()[0])
            head = HeadArrays("logreg", classes, examples.multi_label, out.W, out.b)
            metrics, source = out.metrics, "trained"
        return LoraFit(adapter, head, {**metrics, "seed": seed}, report, source,
                       dataclasses.asdict(cfg) if cfg is not None else None, time.perf_counter() - t0)

    def save_lora(self, tenant: str, name: str, adapter: LoraAdapter, head, examples: Examples, *,
                  metrics: dict | None = None, report=None, source: str = "imported", train_config: dict | None = None,
                  seconds: float | None = None, provenance: dict | None = None) -> dict:
        """Publish adapter (PEFT files) + head + training data as the next version of ``tenant/name``."""
        files = adapter.to_files()
        weights = files["adapter_model.safetensors"]
        entry = {"format": "peft-lora", "source": source, "rank": adapter.rank, "alpha": adapter.alpha,
                 "use_rslora": adapter.use_rslora, "scale": adapter.scale, "targets": adapter.targets,
                 "sha256": hashlib.sha256(weights).hexdigest(), "bytes": sum(map(len, files.values())),
                 "train_config": train_config, "seconds": None if seconds is None else round(seconds, 2)}
        return self._publish(tenant, name, head, examples, metrics=metrics, report=report,
                             extra={"adapter": entry, **(provenance or {})}, files=files)

    def _publish(self, tenant: str, name: str, head, examples: Examples, *, metrics: dict | None, report,
                 extra: dict, files: dict[str, bytes] | None = None, alias: str = LATEST) -> dict:
        """The one manifest builder: the parent backbone, tokenizer and max length, the training
        data (stored beside the version) and its hash, metrics, validation report, library versions,
        the environment lock (``provenance.environment``) and git commit, plus ``extra`` (a caller's
        provenance, e.g. ``canary_hash``); publishes the version and unloads versions no alias names."""
        data_files, data_entry = training_data_files(examples)
        manifest = self.registry.save(tenant, name, head, {
            "parent_fingerprint": self.embedder.fingerprint,
            "tokenizer_hash": self.embedder.tokenizer_hash,
            "max_length": self.embedder.max_length,
            "training_data_hash": examples.source_hash,
            "metrics": metrics,
            "validation": report.to_dict() if report is not None else None,
            "library_versions": library_versions(),
            "environment": environment(),
            "git_commit": git_commit(),
            "training_data": data_entry,
            **extra,
        }, files={**(files or {}), **data_files}, alias=alias)
        self._unload_unaliased(tenant, name)
        return manifest

    def _validate(self, examples: Examples):
        counts = self.embedder.count_tokens([normalise_text(t) for t in examples.texts]) if examples.texts else None
        stats = None
        if counts is not None:
            stats = TokenStats(unk_share=float(counts.n_unk.sum() / max(1, counts.n_tokens.sum())),
                               truncated_share=float(counts.truncated.mean()))
        return validate(examples, stats)


def recorded_lora_config(manifest: dict):
    """The ``LoraTrainConfig`` a LoRA version was trained with (its manifest's ``adapter.train_config``;
    settings this code no longer knows are dropped), or None for an imported adapter, which records none."""
    import dataclasses

    from headfleet.embedder.lora_train import LoraTrainConfig

    recorded = (manifest.get("adapter") or {}).get("train_config")
    if not recorded:
        return None
    known = {f.name for f in dataclasses.fields(LoraTrainConfig)}
    return LoraTrainConfig(**{k: v for k, v in recorded.items() if k in known})
