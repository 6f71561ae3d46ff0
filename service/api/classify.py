"""``POST /classify``: many texts against many classifiers, one embedding per text."""

from __future__ import annotations

from litestar.di import NamedDependency
from litestar.params import JSONBody
from litestar import Controller, Request, post

from headfleet.service.schemas import ClassifyRequest, ClassifyResponse
from headfleet.service.state import Service


class ClassifyController(Controller):
    path = "/classify"
    tags = ["classify"]

    @post("/", status_code=200, summary="Classify texts with several classifiers at once")
    async def classify(self, request: Request, data: JSONBody[ClassifyRequest], service: NamedDependency[Service], tenant: NamedDependency[str]) -> ClassifyResponse:
        """Per text and per classifier: label(s), scores per label, version used; per request:
        cache hits by tier, misses, embeddings computed and time spent queueing, embedding and in heads."""
        return await service.classify(tenant, data.texts, data.classifiers, namespace=data.namespace,
                                      receive=request.receive)  # type: ignore[return-value]
