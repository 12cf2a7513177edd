"""The served model names: `/v1/models` and the `model` field of every request."""
from __future__ import annotations

import time

from fusec.runtime.server.errors import APIError
from fusec.runtime.server.protocol import ModelCard, ModelList


class OpenAIServingModels:
    def __init__(self, served_model_names: list[str], model_path: str, max_model_len: int) -> None:
        self.names = served_model_names
        self.model_path = model_path
        self.max_model_len = max_model_len

    def resolve(self, requested: str | None) -> str:
        """The name a response reports: the requested one, or the first when none is given."""
        if requested is None:
            return self.names[0]
        if requested not in self.names:
            raise APIError(404, f"The model `{requested}` does not exist.", "model")
        return requested

    def list(self) -> ModelList:
        created = int(time.time())
        return ModelList(data=[self._card(name, created) for name in self.names])

    def card(self, name: str) -> ModelCard:
        """`/v1/models/{id}`: one served name's card, 404 for any other."""
        return self._card(self.resolve(name), int(time.time()))

    def _card(self, name: str, created: int) -> ModelCard:
        return ModelCard(id=name, created=created, root=self.model_path, max_model_len=self.max_model_len)
