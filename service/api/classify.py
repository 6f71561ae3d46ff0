"""``POST /classify``: many texts against many classifiers, one embedding per text."""

from __future__ import annotations

from litestar.di import NamedDependency, Provide
from litestar.params import JSONBody
from litestar import Controller, Request, post

from headfleet.errors import ValidationError
from headfleet.lifecycle.experiment_config import check_unit
from headfleet.service.api.deps import provide_tenant_alone
from headfleet.service.schemas import ClassifyRequest, ClassifyResponse
from headfleet.service.state import Service


class ClassifyController(Controller):
    path = "/classify"
    tags = ["classify"]
    dependencies = {"tenant": Provide(provide_tenant_alone)}

    @post("/", status_code=200, summary="Classify texts with several classifiers at once")
    async def classify(self, request: Request, data: JSONBody[ClassifyRequest], tenant: NamedDependency[str]) -> ClassifyResponse:
        """Per text and per classifier: label(s), scores per label, version used; per text: where its
        embeddings came from (a tier, ``miss``, or ``partial`` when it needed several, for LoRA
        classifiers, and only some were held); per request: cache hits by tier, misses, embeddings
        computed and time spent reading adapters (``adapter_load``), queueing, embedding and in heads.
        ``unit`` (or the ``X-Unit-Id`` header): the experiment unit, for sticky A/B assignment; entries
        of a classifier under experiment carry ``experiment: {id, arm, version}``."""
        # the service is read here rather than injected: on the hottest endpoint, one dependency
        # resolution less per request
        service: Service = request.app.state.service
        unit = unit_of(data.unit, request.headers.get("x-unit-id"))
        return await service.classify(tenant, data.texts, data.classifiers, namespace=data.namespace,
                                      receive=request.receive, unit=unit, debug=data.debug)  # type: ignore[return-value]


def unit_of(body: str | None, header: str | None) -> str | None:
    """The experiment unit: the body's ``unit`` or the ``X-Unit-Id`` header (422 when both are given
    and differ, or the unit is malformed)."""
    if body is not None and header is not None and body != header:
        raise ValidationError("the body's unit and the X-Unit-Id header differ; send one", param="unit")
    return check_unit(body if body is not None else header)
