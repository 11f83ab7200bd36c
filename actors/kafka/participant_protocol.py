"""The command/reply wire format between Kafka steps and participant services.

A Kafka step sends a :class:`ParticipantCommand` (JSON) to the participant's
topic, keyed by saga id.  The participant applies it at most once per
``idempotency_key`` (a redelivery, or the same command after an orchestrator
crash, carries the same key) and answers with a :class:`ParticipantReply` on
``reply_topic``, echoing ``saga``, ``seq`` and ``kind`` so the reply finds its
step.  ``ok: false`` means a business failure that retrying cannot fix; a
participant retries its own transient failures before replying.

``kind`` is ``run`` for the step and ``compensate`` for its undo, which uses
the same idempotency key (the participant looks the forward operation up by it).
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Kind = Literal["run", "compensate"]
SCHEMA = 1


class ParticipantCommand(BaseModel):
    # unknown fields are ignored: participants keep working when commands gain fields
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    schema_version: Literal[1] = Field(SCHEMA, alias="schema")
    type: Literal["participant.command"] = "participant.command"
    id: str = Field(description="<saga>:<seq>:<kind>; the same for every re-send")
    kind: Kind
    saga: str
    seq: int = Field(ge=1, description="the stage sequence of the step (of the forward step for an undo)")
    n: int | None = Field(None, description="this saga's command counter, in send order")
    job: str
    step: str
    idempotency_key: str
    reply_topic: str
    data: dict[str, Any] = Field(default_factory=dict, description="what the participant needs, built by the step")
    forward_result: Any = Field(None, description="for kind=compensate: what the forward step recorded")
    correlation_id: str | None = None
    traceparent: str | None = None


class ParticipantReply(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    schema_version: Literal[1] = Field(SCHEMA, alias="schema")
    type: Literal["participant.reply"] = "participant.reply"
    saga: Annotated[str, Field(pattern=r"^[0-9a-f]{24}$")]
    seq: int = Field(ge=1)
    kind: Kind
    idempotency_key: str | None = None
    ok: bool
    result: dict[str, Any] | None = None
    error: str | None = Field(None, max_length=4000)

    @classmethod
    def answering(
        cls, command: ParticipantCommand, *, ok: bool, result: dict[str, Any] | None = None, error: str | None = None
    ) -> "ParticipantReply":
        return cls(
            saga=command.saga, seq=command.seq, kind=command.kind, idempotency_key=command.idempotency_key,
            ok=ok, result=result, error=error,
        )  # fmt: skip

    def to_bytes(self) -> bytes:
        return json.dumps(self.model_dump(mode="json", by_alias=True), separators=(",", ":")).encode()
