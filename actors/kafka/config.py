"""aiokafka keyword arguments built from :class:`~essential.actors.settings.Settings`.

One place turns settings into client options, so the gateway, the example
participant and the benchmark connect the same way: security (SASL, TLS)
passes through unchanged, and producer acks/idempotence follow the settings.
"""
from __future__ import annotations

import ipaddress
from typing import Any

from essential.actors.settings import Settings

#: metadata refresh of the gateway's clients: topics of the memory-only dev
#: broker vanish on a restart and must be found again quickly once recreated
METADATA_MAX_AGE_MS = 5_000
MIB = 1024 * 1024


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bootstrap_is_loopback(bootstrap: str) -> bool:
    """True when every bootstrap server is on this machine (the embedded dev broker)."""
    hosts = [server.strip().rsplit(":", 1)[0] for server in bootstrap.split(",") if server.strip()]
    return bool(hosts) and all(_is_loopback(h) for h in hosts)


def use_idempotence(settings: Settings) -> bool:
    """The setting when given; otherwise on, except for a loopback broker (the dev broker rejects it)."""
    if settings.kafka_acks != "all":
        return False
    if settings.kafka_idempotence is not None:
        return settings.kafka_idempotence
    return not bootstrap_is_loopback(settings.kafka_bootstrap)


def watch_restarts(settings: Settings) -> bool:
    """Whether the gateway checks that the broker kept its log (on by default for a loopback broker)."""
    if settings.kafka_watch_restarts is not None:
        return settings.kafka_watch_restarts
    return bootstrap_is_loopback(settings.kafka_bootstrap)


def client_kwargs(settings: Settings) -> dict[str, Any]:
    """Bootstrap and security options shared by producers, consumers and the admin client."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "security_protocol": settings.kafka_security_protocol,
        "request_timeout_ms": int(settings.kafka_request_timeout * 1000),
    }
    if settings.kafka_sasl_mechanism:
        kwargs["sasl_mechanism"] = settings.kafka_sasl_mechanism
        kwargs["sasl_plain_username"] = settings.kafka_sasl_plain_username
        kwargs["sasl_plain_password"] = settings.kafka_sasl_plain_password
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        kwargs["ssl_context"] = create_ssl_context(
            cafile=settings.kafka_ssl_cafile,
            certfile=settings.kafka_ssl_certfile,
            keyfile=settings.kafka_ssl_keyfile,
            password=settings.kafka_ssl_password,
        )
    return kwargs


def admin_kwargs(settings: Settings) -> dict[str, Any]:
    kwargs = client_kwargs(settings)
    kwargs.pop("bootstrap_servers")
    kwargs.pop("request_timeout_ms")
    return kwargs


def max_request_size(settings: Settings) -> int:
    """Room for a dead letter of any command up to twice the command limit (and at least 1 MiB)."""
    return max(MIB, 2 * settings.kafka_max_command_bytes)


def max_value_bytes(settings: Settings) -> int:
    """The largest message value the gateway's producer sends (headers and framing need the rest)."""
    return max_request_size(settings) - 64 * 1024


def dead_letter_budget(settings: Settings) -> int:
    """The largest dead letter the gateway sends, as Kafka counts a record (its request limit, less framing)."""
    return max_request_size(settings) - 4 * 1024


def producer_kwargs(settings: Settings) -> dict[str, Any]:
    """Acks and idempotence from the settings; requests large enough to dead-letter any command."""
    acks: str | int = settings.kafka_acks if settings.kafka_acks == "all" else int(settings.kafka_acks)
    return {
        **client_kwargs(settings),
        "acks": acks,
        "enable_idempotence": use_idempotence(settings),
        "max_request_size": max_request_size(settings),
        "metadata_max_age_ms": METADATA_MAX_AGE_MS,
        "linger_ms": 2,
    }


def consumer_kwargs(settings: Settings, group_id: str) -> dict[str, Any]:
    """Manual commits (an offset is committed only after its message was handled), earliest when unknown."""
    return {
        **client_kwargs(settings),
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "metadata_max_age_ms": METADATA_MAX_AGE_MS,
        "max_partition_fetch_bytes": max(MIB, 2 * settings.kafka_max_command_bytes),
    }


def gateway_topics(settings: Settings) -> list[str]:
    """Every topic the gateway reads or writes, created at start-up (the dev broker forgets them)."""
    from essential.orchestration.states import EventType

    return [
        settings.kafka_command_topic,
        settings.kafka_dlq_topic,
        settings.kafka_reply_topic,
        settings.kafka_reply_dlq_topic,
        *(e.value for e in EventType),
    ]
