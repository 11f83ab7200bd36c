"""One settings object, read from ``ESSENTIAL_*`` environment variables.

Every default works on a laptop with the embedded servers that ``essential up``
starts; production points ``ESSENTIAL_MONGODB_URI`` and
``ESSENTIAL_KAFKA_BOOTSTRAP`` at real clusters.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ESSENTIAL_", extra="ignore")

    mongodb_uri: str = Field(
        "mongodb://127.0.0.1:27117/?replicaSet=secantus",
        description="MongoDB replica set (transactions needed); the embedded dev server by default",
    )
    database: str = Field("essential", description="database holding sagas, stages and outbox")
    kafka_bootstrap: str = Field("127.0.0.1:19092", description="Kafka bootstrap servers")
    ray_address: str | None = Field(
        None, description="Ray cluster to join (host:port or ray://host:port); the stack's head when unset"
    )
    namespace: str = Field("essential", description="Ray namespace of every Essential actor")
    job_modules: list[str] = Field(
        default_factory=list,
        description="modules whose module-level Job objects are registered (JSON list or comma separated); "
        "the dev stack (`essential up`, `essential demo`) registers examples.jobs when unset",
    )
    max_live_sagas: int = Field(
        32, ge=1,
        description="dedicated and pooled placement: saga actors alive at once (each a process of ~100 MB); "
        "more wait as pending (shared placement: max_shared_sagas)",
    )
    placement: Literal["dedicated", "shared", "pooled"] = Field(
        "shared",
        description=(
            "shared (the fastest, see docs/performance.md): sagas run as tasks in a pool of host actors; "
            "pooled: one actor per live saga, taken from a warm pool of max_live_sagas actors and reused; "
            "dedicated: one actor per live saga, started for it (full process isolation, a process start per saga)"
        ),
    )
    shared_jobs: list[str] = Field(default_factory=list, description="jobs placed shared even when placement is dedicated")
    host_pool_size: int = Field(4, ge=1, description="host actors of the shared placement")
    max_shared_sagas: int = Field(5000, ge=1, description="sagas live at once across the shared hosts")
    supervisor_interval: float = Field(2.0, gt=0, description="seconds between supervisor sweeps")
    max_restore_attempts: int = Field(5, ge=1, description="restores without progress before a saga is parked")
    ttl_grace: float = Field(10.0, ge=0, description="seconds past TTL before a hung saga actor is killed")
    hung_after: float = Field(
        60.0, gt=0,
        description=(
            "seconds a compensating saga may go without progress before the supervisor asks its actor to answer; "
            "one that does not (a compensation blocking its process) is replaced and the saga restored"
        ),
    )  # fmt: skip
    retention: float = Field(7 * 24 * 3600, gt=0, description="seconds terminal sagas keep stage payloads")
    history_retention: float = Field(
        90 * 24 * 3600, ge=0,
        description="seconds after which a terminal saga is deleted with its stages and signals (0 keeps them for ever)",
    )  # fmt: skip
    fold_checkpoints: bool = Field(
        True, description="fold a step's result checkpoint into the next step's write-ahead: one transaction per step"
    )
    home: Path = Field(Path(".essential"), description="state of the local stack: data dirs, PIDs, logs")
    mongodb_port: int = Field(27117, description="port of the embedded MongoDB (essential up)")
    kafka_port: int = Field(19092, description="port of the embedded Kafka broker (essential up)")
    ray_port: int = Field(6389, description="GCS port of the local Ray head (essential up)")
    dashboard_port: int = Field(8265, description="Ray dashboard port (essential up)")

    # -- Kafka gateway -----------------------------------------------------------------------
    kafka_command_topic: str = Field("saga.commands", description="JSON commands (start, abort, commit) the gateway applies")
    kafka_dlq_topic: str = Field(
        "saga.commands.dlq", description="rejected commands: the original bytes plus dlq.* headers saying why"
    )
    kafka_reply_topic: str = Field("saga.replies", description="participants' replies to commands sent by Kafka steps")
    kafka_reply_dlq_topic: str = Field("saga.replies.dlq", description="replies that could not be understood")
    kafka_consumer_group: str = Field(
        "essential-gateway", description="consumer group of every gateway (replies use '<group>.replies')"
    )
    kafka_partitions: int = Field(4, ge=1, description="partitions of the topics the gateway creates")
    kafka_create_topics: bool = Field(True, description="create the gateway's topics at start-up and after they vanish")
    kafka_max_command_bytes: int = Field(
        256 * 1024, ge=1024, description="commands larger than this go to the dead-letter topic unread"
    )
    kafka_acks: Literal["all", "1", "0"] = Field("all", description="producer acks: 'all' for a real Kafka")
    kafka_idempotence: bool | None = Field(
        None,
        description=(
            "idempotent producer; unset = on unless every bootstrap server is a loopback address "
            "(the embedded dev broker rejects it); needs kafka_acks='all'"
        ),
    )
    kafka_watch_restarts: bool | None = Field(
        None,
        description=(
            "detect a broker that lost its log (the dev broker's memory storage) with a canary topic and "
            "re-publish what it may have dropped; unset = on for a loopback bootstrap"
        ),
    )
    kafka_request_timeout: float = Field(10.0, gt=0, description="seconds before a Kafka request (and a publish) fails")
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="passed to aiokafka as security_protocol"
    )
    kafka_sasl_mechanism: str | None = Field(None, description="PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or GSSAPI")
    kafka_sasl_plain_username: str | None = Field(None, description="SASL user (PLAIN and SCRAM)")
    kafka_sasl_plain_password: str | None = Field(None, description="SASL password (PLAIN and SCRAM)")
    kafka_ssl_cafile: str | None = Field(None, description="CA bundle that signs the brokers' certificates")
    kafka_ssl_certfile: str | None = Field(None, description="client certificate (mutual TLS)")
    kafka_ssl_keyfile: str | None = Field(None, description="client private key (mutual TLS)")
    kafka_ssl_password: str | None = Field(None, description="password of the client private key")
    relay_batch_size: int = Field(500, ge=1, description="outbox rows one relay round reads and publishes")
    relay_poll_interval: float = Field(0.2, gt=0, description="seconds the relay waits when the outbox is empty")
    relay_lease_seconds: float = Field(
        60.0, gt=0, description="one gateway relays an outbox at a time; a standby takes over this long after it died"
    )
    participant_poll_interval: float = Field(
        0.2, gt=0, description="longest pause between two inbox reads of a Kafka step waiting for its reply"
    )
    kafka_retry_seconds: float = Field(
        120.0,
        gt=0,
        description=(
            "how long a command or reply whose handling fails transiently (MongoDB, Ray or Kafka away) is "
            "retried before it is dead-lettered as gave_up"
        ),
    )
    kafka_handler_timeout: float = Field(
        90.0, gt=0, description="seconds one attempt at handling a command or reply may take; past it, it counts as transient"
    )
    kafka_prune_interval: float = Field(
        600.0,
        gt=0,
        description=(
            "seconds between prunes of what the gateway keeps past ESSENTIAL_RETENTION: sent, refused and withdrawn "
            "outbox rows, command-log entries, and the replies and command counters of ended sagas"
        ),
    )
    kafka_fault_gates: bool = Field(
        False,
        description=(
            "fault tests only: hold a command whose essential-gate header reads applied:<id> or logged:<id> until "
            "<id> is in the gates collection; never in production (any producer could stall a partition)"
        ),
    )

    # -- operators ------------------------------------------------------------------------------
    log_format: Literal["kv", "json"] = Field(
        "kv", description="saga processes' log lines: key=value text or one JSON object per line"
    )
    log_level: str = Field("INFO", description="level of Essential's loggers in saga processes")

    # -- recorded sagas and the HTTP API --------------------------------------------------------
    recorded_default_job: str = Field("recorded", description="job label of a recorded saga started without one")
    recorded_buckets: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            'bucket -> where its documents live, JSON: {"shop.orders": {"database": "shop_eu", "collection": '
            '"orders"}, "payments.*": {"remote": "payments.commands"}}; unmapped buckets service.collection '
            "are database <prefix>service, collection collection on ESSENTIAL_MONGODB_URI"
        ),
    )
    recorded_db_prefix: str = Field("", description="prefix of the database of an unmapped bucket's service")
    recorded_remote_timeout: float = Field(
        60.0, gt=0, description="seconds to wait for a remote bucket's service to confirm a compensation before parking"
    )
    recorded_call_timeout: float = Field(60.0, gt=0, description="seconds an add/commit/abort may take end to end")
    recorded_abort_wait: float = Field(
        30.0, ge=0, description="seconds an HTTP/client abort waits for the compensation before answering"
    )
    recorded_undo_pause: float = Field(0.0, ge=0, description="pause before each undo (demos and fault tests)")
    recorded_databases: str = Field(
        "*",
        description=(
            "databases a recorded bucket may resolve to: comma-separated names or glob patterns (shop,billing_*) "
            "or a JSON list; '*' is every database but those never allowed whatever this says: Essential's own "
            "(ESSENTIAL_DATABASE), admin, local, config, and any database holding an Essential deployment's sagas"
        ),
    )
    recorded_cache_size: int = Field(
        10_000, ge=1, description="open recorded sagas whose actor handle and job the supervisor caches (LRU, 10 min idle)"
    )
    http_host: str = Field("127.0.0.1", description="address the HTTP API (Ray Serve) binds to")
    http_port: int = Field(8780, description="port of the HTTP API")
    http_token: str | None = Field(
        None, description="bearer token of the HTTP API; `essential up` generates <home>/http_token when unset"
    )
    http_max_body_bytes: int = Field(1024 * 1024, ge=1024, description="larger request bodies are refused (413)")
    http_replicas: int = Field(1, ge=1, description="Ray Serve replicas of the HTTP API")
    http_route_prefix: str = Field("/", description="route prefix of the HTTP API's Serve application")

    @field_validator("kafka_acks", mode="before")
    @classmethod
    def _acks_as_text(cls, value: object) -> object:
        return str(value) if isinstance(value, int) else value

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):  # type: ignore[no-untyped-def]
        return (init_settings, _CommaListEnv(settings_cls), dotenv_settings, file_secret_settings)




class _CommaListEnv(EnvSettingsSource):
    """Accept ``a,b`` as well as JSON for list settings such as ESSENTIAL_JOB_MODULES."""

    def prepare_field_value(self, field_name, field, value, value_is_complex):  # type: ignore[no-untyped-def]
        if field_name in ("job_modules", "shared_jobs") and isinstance(value, str) and not value.lstrip().startswith("["):
            return [part.strip() for part in value.split(",") if part.strip()]
        return super().prepare_field_value(field_name, field, value, value_is_complex)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


#: the deployment whose sagas this process runs (set by the saga runtime), for job code
_deployment: Settings | None = None


def deployment_settings() -> Settings:
    """The settings job code should reach its services with: in a saga process, those of the
    deployment whose sagas it runs (sent by the supervisor, whatever the worker's environment
    says); anywhere else, the environment's (:func:`get_settings`)."""
    return _deployment if _deployment is not None else get_settings()


def run_under(settings: Settings) -> None:
    """This process runs sagas of ``settings``' deployment: :func:`deployment_settings` returns them."""
    global _deployment
    _deployment = settings


def settings_from(data: dict[str, Any] | Settings | None) -> Settings:
    """Settings sent to an actor as a dict (actors receive JSON-safe arguments); None reads the environment."""
    if isinstance(data, Settings):
        return data
    return Settings(**data) if data else Settings()
