"""The error contract: what each typed error becomes on HTTP and on Kafka, in one table.

A refusal travels as the envelope of :func:`essential.orchestration.errors.envelope`
(``{"error": {"type", "message", "fields"?}}``) from whichever process refused it;
each transport turns the ``type`` into its own terms here, so an error a client
can cause gets the same meaning over Ray, HTTP and Kafka.

====================  ======  ========================  ==========================================
type                  HTTP    dead-letter code          meaning
====================  ======  ========================  ==========================================
InvalidField          400     invalid_command           a field of the request names what to fix
InvalidRequest        400     invalid_command           the request cannot be accepted as given
InvalidPayload        400     invalid_payload           the job's payload model refused it
UnknownJob            400     unknown_job               no job of that name is registered
SagaNotFound          404     saga_not_found            no such saga
IllegalTransition     409     illegal_transition        the saga's state forbids the operation
LockBusy              409     rejected                  a lock is held by another live saga
IdempotencyKeyReused  422     idempotency_key_reused    a key reused with other parameters
SagaIdReused          422     invalid_command           a saga id reused with other parameters
CorruptDocument       500     rejected                  Essential cannot read what it stored
EssentialError        503     rejected                  retry shortly (an actor did not answer ...)
TooManyOpenSagas      503     rejected                  no room for another live saga now
StoreUnavailable      503     rejected                  MongoDB is away
JobModuleMissing      503     rejected                  a job module is not importable here
JobVersionMissing     503     rejected                  the saga's job version is not deployed here
====================  ======  ========================  ==========================================

Any other type is a 500 and ``rejected``.  (Kafka-only refusals - a message that is
not JSON, too large, too deep - have their own codes in :mod:`essential.actors.kafka.commands`.)
"""
from __future__ import annotations

from typing import NamedTuple


class ErrorCode(NamedTuple):
    http_status: int
    dead_letter: str


#: stable: operators' dashboards and alerts, and the platform's clients, key on these
CONTRACT: dict[str, ErrorCode] = {
    "InvalidField": ErrorCode(400, "invalid_command"),
    "InvalidRequest": ErrorCode(400, "invalid_command"),
    "InvalidPayload": ErrorCode(400, "invalid_payload"),
    "UnknownJob": ErrorCode(400, "unknown_job"),
    "SagaNotFound": ErrorCode(404, "saga_not_found"),
    "IllegalTransition": ErrorCode(409, "illegal_transition"),
    "LockBusy": ErrorCode(409, "rejected"),
    "IdempotencyKeyReused": ErrorCode(422, "idempotency_key_reused"),
    "SagaIdReused": ErrorCode(422, "invalid_command"),
    "CorruptDocument": ErrorCode(500, "rejected"),
    # Essential's base error says "retry shortly": an actor that did not answer, a saga being restored
    "EssentialError": ErrorCode(503, "rejected"),
    "TooManyOpenSagas": ErrorCode(503, "rejected"),
    "StoreUnavailable": ErrorCode(503, "rejected"),
    "JobModuleMissing": ErrorCode(503, "rejected"),
    "JobVersionMissing": ErrorCode(503, "rejected"),
}
UNLISTED = ErrorCode(500, "rejected")


def http_status(type_name: str) -> int:
    return CONTRACT.get(type_name, UNLISTED).http_status


def dead_letter_code(type_name: str) -> str:
    return CONTRACT.get(type_name, UNLISTED).dead_letter
