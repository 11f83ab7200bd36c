"""Essential: durable sagas on Ray, checkpointed to MongoDB, bridged to Kafka.

Everything a job module, a client or a participant service needs is importable
from here::

    from essential import Job, StepContext, StepFailed, EssentialClient

Names load on first use, so a job module that imports only the DSL does not pay
for Ray's client or PyMongo (a dedicated saga process imports every job module).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    # writing jobs
    **dict.fromkeys(
        ["Job", "Step", "StepContext", "Lock", "RetryPolicy", "NO_RETRY", "StepFn", "CompensateFn"], "essential.orchestration.dsl"
    ),
    **dict.fromkeys(["Clock", "ManualClock", "SystemClock"], "essential.orchestration.clock"),
    **dict.fromkeys(
        [
            "EssentialError", "StepFailed", "StepTimeout", "RetryLater", "IllegalTransition", "InvalidPayload",
            "InvalidRequest", "SagaNotFound", "UnknownJob", "IdempotencyKeyReused", "LockBusy", "LeaseLost",
            "JobModuleMissing", "JobVersionMissing",
        ],
        "essential.orchestration.errors",
    ),
    **dict.fromkeys(["Saga", "Stage", "Event", "Signal"], "essential.orchestration.models"),
    **dict.fromkeys(["SagaState", "StageStatus", "EventType", "Action"], "essential.orchestration.states"),
    # steps carried out by participant services over Kafka, and the services' side of the wire
    "kafka_step": "essential.actors.kafka.participants",
    **dict.fromkeys(["ParticipantCommand", "ParticipantReply"], "essential.actors.kafka.participant_protocol"),
    **dict.fromkeys(["admin_kwargs", "client_kwargs", "consumer_kwargs", "producer_kwargs"], "essential.actors.kafka.config"),
    "ensure_topics": "essential.actors.kafka.topics",
    # the client
    **dict.fromkeys(["EssentialClient", "stop_deployment"], "essential.actors.client.ray_client"),
    # configuration, and MongoDB for a job's own services
    **dict.fromkeys(["Settings", "get_settings", "deployment_settings"], "essential.actors.settings"),
    "shared_client": "essential.persistence.connection",
}  # fmt: skip

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'essential' has no attribute {name!r}; the public names are {', '.join(__all__)}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # what type checkers and IDEs see
    from essential.actors.client.ray_client import EssentialClient, stop_deployment
    from essential.actors.kafka.config import admin_kwargs, client_kwargs, consumer_kwargs, producer_kwargs
    from essential.actors.kafka.participant_protocol import ParticipantCommand, ParticipantReply
    from essential.actors.kafka.participants import kafka_step
    from essential.actors.kafka.topics import ensure_topics
    from essential.actors.settings import Settings, deployment_settings, get_settings
    from essential.orchestration.clock import Clock, ManualClock, SystemClock
    from essential.orchestration.dsl import NO_RETRY, CompensateFn, Job, Lock, RetryPolicy, Step, StepContext, StepFn
    from essential.orchestration.errors import (
        EssentialError,
        IdempotencyKeyReused,
        IllegalTransition,
        InvalidPayload,
        InvalidRequest,
        JobModuleMissing,
        JobVersionMissing,
        LeaseLost,
        LockBusy,
        RetryLater,
        SagaNotFound,
        StepFailed,
        StepTimeout,
        UnknownJob,
    )  # fmt: skip
    from essential.orchestration.models import Event, Saga, Signal, Stage
    from essential.orchestration.states import Action, EventType, SagaState, StageStatus
    from essential.persistence.connection import shared_client
