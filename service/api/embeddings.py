"""Embeddings in the shapes existing clients speak: text-embeddings-inference's ``POST /embed``
and OpenAI's ``POST /v1/embeddings`` (+ ``GET /v1/models``), through the same cache as ``/classify``."""

from __future__ import annotations

import asyncio
import base64
import functools
from pathlib import Path

import numpy as np
from litestar.di import NamedDependency
from litestar.params import JSONBody
from litestar import Controller, Request, get, post

from headfleet.embedder.backbone import default_model_path
from headfleet.errors import NotFoundError, TooLargeError, ValidationError
from headfleet.service.schemas import OpenAIEmbeddingsRequest, OpenAIEmbeddingsResponse, TEIEmbedRequest
from headfleet.service.state import Service


@functools.lru_cache(maxsize=8)
def backbone_name(folder_path: str) -> str:
    """The default backbone by its model name; any other by its folder's name (resolved once)."""
    folder = Path(folder_path)
    try:
        if folder.resolve() == Path(default_model_path()).resolve():
            return DEFAULT_MODEL_NAME
    except Exception:  # the default package is not installed: a custom backbone, named by its folder
        pass
    return folder.name


@functools.lru_cache(maxsize=8)
def backbone_prompts(folder_path: str) -> dict[str, str]:
    """The backbone's named prompts (sentence-transformers' ``config_sentence_transformers.json``)."""
    import json

    try:
        cfg = json.loads((Path(folder_path) / "config_sentence_transformers.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    prompts = cfg.get("prompts") if isinstance(cfg, dict) else None
    return {str(k): str(v) for k, v in prompts.items()} if isinstance(prompts, dict) else {}


def model_names(service: NamedDependency[Service]) -> list[str]:
    """Names ``model`` may take: the backbone's name, its hub id for the default, and ``headfleet``."""
    name = backbone_name(str(service.engine.embedder.folder))
    names = [name, "headfleet"]
    if name == DEFAULT_MODEL_NAME:
        names.append(f"sentence-transformers/{DEFAULT_MODEL_NAME}")
    return names


DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"


class EmbeddingsController(Controller):
    tags = ["embeddings"]

    @post("/embed", status_code=200, summary="Embed texts (text-embeddings-inference shape)")
    async def embed(self, request: Request, data: JSONBody[TEIEmbedRequest], service: NamedDependency[Service], tenant: NamedDependency[str]) -> list[list[float]]:
        """Body ``{"inputs": str | [str], "normalize": true, "truncate": false}``; answer ``[[float, ...], ...]``.

        As in TEI, a text over the backbone's token limit is refused (413) unless ``truncate`` is true.
        """
        texts = [data.inputs] if isinstance(data.inputs, str) else data.inputs
        service.check_texts(texts, "inputs")
        if data.prompt_name is not None:
            prompts = backbone_prompts(str(service.engine.embedder.folder))
            if data.prompt_name not in prompts:
                raise ValidationError(f"prompt_name {data.prompt_name!r} is not one of this backbone's prompts "
                                      f"({sorted(prompts) or 'it has none'}); omit prompt_name", param="prompt_name")
            texts = [prompts[data.prompt_name] + t for t in texts]
        if not data.normalize and service.engine.embedder.pooling.normalize:
            raise ValidationError("this backbone's vectors are unit-normalised by its pooling config, and the cache "
                                  "holds them that way; normalize=false is not available", param="normalize")
        batch = await service.embed(tenant, texts, receive=request.receive)
        if not data.truncate and batch.truncated.any():
            first = int(np.argmax(batch.truncated))
            raise TooLargeError(f"inputs[{first}] is longer than the backbone's {service.engine.embedder.max_length} "
                                "tokens; send truncate=true to embed its first tokens")
        return batch.vectors.tolist()

    @get("/v1/models", summary="Models (OpenAI shape)")
    async def models(self, service: NamedDependency[Service], tenant: NamedDependency[str]) -> dict:
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "headfleet"}
                                           for n in model_names(service)]}

    @post("/v1/embeddings", status_code=200, summary="Embed texts (OpenAI shape)")
    async def openai_embeddings(self, request: Request, data: JSONBody[OpenAIEmbeddingsRequest], service: NamedDependency[Service],
                                tenant: NamedDependency[str]) -> OpenAIEmbeddingsResponse:
        """Body ``{"input": str | [str], "model": ..., "encoding_format": "float" | "base64"}``.

        Texts longer than the backbone's limit are embedded from their first tokens; ``usage``
        counts the tokens actually embedded.
        """
        raw = data.input
        if isinstance(raw, str):
            texts = [raw]
        elif isinstance(raw, list) and all(isinstance(t, str) for t in raw):
            texts = raw
        elif isinstance(raw, list) and raw and all(isinstance(t, (int, list)) for t in raw):
            raise ValidationError("token-id input is not supported: this service embeds text; send strings",
                                  param="input")
        else:
            raise ValidationError("input must be a string or a list of strings", param="input")
        names = model_names(service)
        if data.model not in names:
            raise NotFoundError(f"model {data.model!r} is not served here; use one of {names}", param="model")
        dim = service.engine.embedder.dim
        if data.dimensions is not None and data.dimensions != dim:
            raise ValidationError(f"dimensions={data.dimensions} is not available; this backbone gives {dim}",
                                  param="dimensions")
        if data.user is not None:
            raise ValidationError("user is not supported: headfleet neither records nor acts on end-user ids; omit it",
                                  param="user")
        service.check_texts(texts, "input")
        batch = await service.embed(tenant, texts, receive=request.receive)
        counts = await asyncio.to_thread(service.engine.embedder.count_tokens, texts)
        n_tokens = int(np.minimum(counts.n_tokens, service.engine.embedder.max_length).sum())
        if data.encoding_format == "base64":
            items = [base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode() for v in batch.vectors]
        else:
            items = batch.vectors.tolist()
        return {"object": "list", "model": data.model,  # type: ignore[return-value]
                "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(items)],
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}
