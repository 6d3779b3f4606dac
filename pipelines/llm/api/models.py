"""``GET /v1/models`` and ``GET /v1/models/{model}``: the served models, in OpenAI's shape."""

from __future__ import annotations

from pipelines.llm.api.openai_base import OpenAIAPI
from pipelines.llm.limits import path_parameter
from pipelines.llm.schema import Model, ModelList
from pipelines.llm.served_models import ServedModel
from runner.pipeline import RequestContext


class ModelsAPI(OpenAIAPI):
    SERVES = {"listModels": "list_models", "retrieveModel": "retrieve_model"}

    def card(self, model: ServedModel) -> Model:
        card = Model(id=model.id, object="model", created=self.models.created, owned_by="livepeer", parent=model.parent)
        if self.generation.ready:
            card.max_model_len = self.generation.max_model_len
        return card

    async def list_models(self, _body: None, context: RequestContext) -> ModelList:
        return ModelList(object="list", data=[self.card(model) for model in self.models.all()])

    async def retrieve_model(self, _body: None, context: RequestContext) -> Model:
        return self.card(self.served(path_parameter(context.params, "model")))
