"""Classifier management: train (as a job), list, show, delete, move an alias; poll jobs."""

from __future__ import annotations

import asyncio
from typing import Any

from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody
from litestar import Controller, Request, Response, delete, get, post, put

from headfleet.errors import ConflictError, TrainingDataError, ValidationError
from headfleet.heads import examples_from_records, validate
from headfleet.names import check_name
from headfleet.heads.retrain import mark_stale, needs_retrain
from headfleet.heads.types import KINDS
from headfleet.service.request import convert, decode_json_body, uploaded_examples
from headfleet.service.schemas import AliasRequest, ScoreJobRequest, TrainRequest
from headfleet.service.state import Service


def _summary(manifest: dict[str, Any]) -> dict[str, Any]:
    keep = ("id", "name", "version", "created", "labels", "multi_label", "kind", "metrics", "validation",
            "parent_fingerprint", "training_data_hash", "training_data", "retrained_from", "training_cache",
            "library_versions", "type", "adapter", "canary_hash")
    return {k: manifest[k] for k in keep if k in manifest}


class ClassifiersController(Controller):
    path = "/classifiers"
    tags = ["classifiers"]

    @post("/", status_code=202, summary="Train a classifier (returns a job to poll)")
    async def train(self, request: Request, service: NamedDependency[Service], tenant: NamedDependency[str]) -> Response:
        """JSON ``{"name", "examples": [{"text", "label"}], "kind": "logreg"|"mlp"|"lora", "multi_label", "seed"}``,
        or ``multipart/form-data`` with a ``file`` (.csv with a header row, or .jsonl) and fields ``name``,
        ``kind``, ``text_col``, ``label_col``, ``multi_label``, ``candidate`` (publish with the ``candidate``
        alias, ``latest`` unmoved). The data is checked before the job is queued:
        refusals (one class, empty texts, a class with one example, missing columns) answer 422 at once."""
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            form = await request.form()
            name = str(form.get("name") or "")
            if not name.strip():
                raise ValidationError("the multipart form needs a 'name' field: the classifier's name", param="name")
            kind = str(form.get("kind") or "logreg")
            multi = str(form.get("multi_label") or "false").lower() in ("1", "true", "yes")
            seed_text = str(form.get("seed") or "0")
            if not seed_text.isdigit():
                raise ValidationError(f"seed must be a non-negative integer, got {seed_text!r}")
            seed = int(seed_text)
            candidate = str(form.get("candidate") or "false").lower() in ("1", "true", "yes")
            examples = await uploaded_examples(form, multi_label=multi, missing=(
                "multipart upload needs a 'file' part (.csv or .jsonl) and a 'name' field"))
        else:
            body = convert(decode_json_body(await request.body()), TrainRequest)
            name, kind, multi, seed, candidate = body.name, body.kind, body.multi_label, body.seed, body.candidate
            label_col = "labels" if multi and body.examples and "labels" in body.examples[0] else "label"
            examples = examples_from_records(body.examples, label_col=label_col, multi_label=multi)
        check_name(name, "classifier name")
        if kind not in (*KINDS, "lora"):
            raise ValidationError(f"unknown classifier kind {kind!r}; expected one of {[*KINDS, 'lora']}")
        if kind == "lora":
            if candidate:
                raise ValidationError("a LoRA classifier cannot be published as a candidate yet: train it under "
                                      "another name, or move its aliases after training", param="candidate")
        if len(examples.texts) == 0:
            raise TrainingDataError("no examples given")
        await asyncio.to_thread(validate, examples)  # refusals raise here, before any job exists
        job = service.jobs.submit(tenant, name, examples, kind=kind, seed=seed, candidate=candidate)
        return Response({"job": job}, status_code=202, headers={"Location": f"/jobs/{job['id']}"})

    @get("/", summary="List this tenant's classifiers")
    async def list_classifiers(self, service: NamedDependency[Service], tenant: NamedDependency[str]) -> dict:
        """Each with ``type`` (the head's kind), ``adapter`` (null for a head on the shared embedding; a
        LoRA classifier's ``{format, source, rank, alpha, targets}``) and ``needs_retrain`` (and
        ``stale_aliases``): trained on another backbone than the loaded one, so it refuses to load
        until ``headfleet retrain`` refits it."""
        def listing() -> list[dict]:
            reg, fp = service.engine.registry, service.engine.embedder.fingerprint
            return mark_stale(reg.list(tenant), needs_retrain(reg, tenant, fp))

        return {"classifiers": await asyncio.to_thread(listing)}

    @get("/{name:str}", summary="A classifier: manifest of the latest version, versions, aliases")
    async def show(self, name: FromPath[str], service: NamedDependency[Service], tenant: NamedDependency[str]) -> dict:
        reg = service.engine.registry
        ref = name  # "spam" or "spam@3" / "spam@prod" for one version
        manifest = await asyncio.to_thread(reg.resolve, tenant, ref)
        base = manifest["name"]
        return {"classifier": _summary(manifest), "versions": reg.versions(tenant, base),
                "aliases": reg.aliases(tenant, base)}

    @delete("/{name:str}", status_code=200, summary="Delete a classifier with all its versions")
    async def remove(self, name: FromPath[str], service: NamedDependency[Service], tenant: NamedDependency[str]) -> dict:
        if "@" in name:
            raise ValidationError("delete takes a classifier name; versions are immutable and go with it")
        await asyncio.to_thread(service.engine.delete, tenant, name)
        await asyncio.to_thread(service.experiments.forget, tenant, name)  # a running experiment stops
        await asyncio.to_thread(service.shadows.forget, tenant, name)
        await asyncio.to_thread(service.monitor.forget, tenant, name)  # its feedback, canary, windows, shadow
        return {"deleted": name}

    @put("/{name:str}/aliases/{alias:str}", summary="Point an alias at a version")
    async def move_alias(self, name: FromPath[str], alias: FromPath[str], data: JSONBody[AliasRequest], service: NamedDependency[Service], tenant: NamedDependency[str]) -> dict:
        aliases = await asyncio.to_thread(service.engine.registry.set_alias, tenant, name, alias, data.version)
        return {"classifier": name, "aliases": aliases}


class JobsController(Controller):
    path = "/jobs"
    tags = ["jobs"]

    @post("/", status_code=202, summary="Score a document store in the tenant's scoring folder (returns a job)")
    async def submit(self, data: JSONBody[ScoreJobRequest], service: NamedDependency[Service],
                     tenant: NamedDependency[str]) -> Response:
        """``{"source", "classifiers", "output"?, "id_col"?, "text_col"?, "table"?, "format"?, "namespace"?,
        "overwrite"?}``; paths are relative to ``<HEADFLEET_SCORING_ROOT>/<tenant>/``. The store is opened
        and the classifiers pinned to versions before the job is queued: problems answer 4xx at once."""
        body = data
        service.check_classifiers(body.classifiers)
        service.check_namespace(tenant, body.namespace)
        job = await asyncio.to_thread(service.scoring.submit, tenant, body)
        return Response({"job": job}, status_code=202, headers={"Location": f"/jobs/{job['id']}"})

    @get("/", summary="This tenant's jobs (training and scoring), newest first")
    async def list_jobs(self, service: NamedDependency[Service], tenant: NamedDependency[str]) -> dict:
        jobs = service.jobs.list(tenant) + service.scoring.list(tenant)
        return {"jobs": sorted(jobs, key=lambda j: j["created"], reverse=True)}

    @get("/{job_id:str}", summary="A job: state, progress (with counts and ETA for scoring), result or error")
    async def show(self, job_id: FromPath[str], service: NamedDependency[Service], tenant: NamedDependency[str]) -> dict:
        if job_id.startswith("score_"):
            return {"job": service.scoring.get(tenant, job_id)}
        return {"job": service.jobs.get(tenant, job_id)}

    @delete("/{job_id:str}", status_code=202, summary="Cancel a scoring job (between two chunks)")
    async def cancel(self, job_id: FromPath[str], service: NamedDependency[Service], tenant: NamedDependency[str]) -> dict:
        if job_id.startswith("score_"):
            return {"job": await asyncio.to_thread(service.scoring.cancel, tenant, job_id)}
        service.jobs.get(tenant, job_id)  # another tenant's or a made-up id: the same 404
        raise ConflictError(f"job {job_id!r} is a training job; training jobs run to completion")

