"""Every Ray actor name Essential uses, in one place.

Names are how processes find each other (a client its supervisor, a saga process
its supervisor, the supervisor a saga's actor), so every module that looks an
actor up imports its name from here, not from the module that defines the actor.
"""
from __future__ import annotations

#: the control plane every client talks to, and the sweeper (one per namespace)
SUPERVISOR_NAME = "essential:supervisor"
#: the Kafka gateway
GATEWAY_NAME = "essential:gateway"
#: where short-lived saga actors send their metric points
SINK_NAME = "essential:metrics"


def actor_name(saga_id: str) -> str:
    """A dedicated saga actor's name: one per live saga."""
    return f"saga:{saga_id}"


def host_name(index: int) -> str:
    """A shared or pooled host actor's name: a fixed pool, numbered from 0."""
    return f"essential:host:{index}"
