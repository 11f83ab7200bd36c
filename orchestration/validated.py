"""Request models that refuse bad input with one typed error naming every bad field."""
from __future__ import annotations

from typing import Any, ClassVar, Self

from pydantic import BaseModel, ValidationError

from essential.orchestration.errors import invalid


class Validated(BaseModel):
    #: what the request is called in its refusal ("invalid start request: ttl: ...")
    WHAT: ClassVar[str] = "request"

    @classmethod
    def parse(cls, data: Any) -> Self:
        """Validate raw input (a dict from a client, Kafka or HTTP), raising :class:`InvalidRequest`."""
        if isinstance(data, cls):
            return data
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise invalid(cls.WHAT, exc) from None
