"""Essential's domain: models, the lifecycle table, the job DSL and registry, both saga runners.

No Ray, PyMongo or aiokafka here (tests/test_layers.py enforces it).
"""
from essential.orchestration.clock import Clock, ManualClock, SystemClock
from essential.orchestration.dsl import NO_RETRY, Job, Lock, RetryPolicy, Step, StepContext
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
    UnknownJob,
)
from essential.orchestration.models import Event, Lease, Saga, Signal, Stage, StageMeta, new_id
from essential.orchestration.ports import RunnerObserver, SagaStore
from essential.orchestration.registry import JobRegistry
from essential.orchestration.requests import StartRequest, build_saga
from essential.orchestration.runner import SagaRunner
from essential.orchestration.states import LIVE_STATES, TERMINAL_STATES, Action, EventType, SagaState, StageStatus

__all__ = [
    "Action", "Clock", "EssentialError", "Event", "EventType", "IdempotencyKeyReused", "IllegalTransition", "InvalidPayload",
    "InvalidRequest", "Job", "JobModuleMissing", "JobRegistry", "JobVersionMissing", "LIVE_STATES", "Lease", "LeaseLost",
    "NO_RETRY", "RetryPolicy", "RunnerObserver", "Saga", "SagaNotFound", "SagaRunner", "SagaState", "SagaStore",
    "Stage", "StageMeta", "StageStatus", "StartRequest", "Step", "StepContext", "StepFailed",
    "SystemClock", "TERMINAL_STATES", "UnknownJob", "build_saga", "new_id",
    "Lock", "LockBusy", "ManualClock", "RetryLater", "Signal",
]
