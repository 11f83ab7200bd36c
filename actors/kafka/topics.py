"""Creating Kafka topics Essential needs, idempotently (start-up, and after a broker lost them)."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

_TOPIC_ALREADY_EXISTS = 36  # Kafka protocol error code


async def ensure_topics(
    bootstrap: str,
    names: Iterable[str],
    partitions: int = 1,
    replication_factor: int = 1,
    timeout: float = 30.0,
    **admin_options: Any,
) -> list[str]:
    """Create the topics in ``names`` that do not exist yet; return the ones created.

    Why: a broker may lose topics (the embedded dev broker keeps them in memory only), so every start-up
    (and every consumer after a broker restart) must be able to recreate them;
    a topic that already exists, or that another process creates concurrently,
    is not an error.  ``admin_options`` (security settings) go to the admin client.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    wanted = list(dict.fromkeys(names))
    if not wanted:
        return []
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000), **admin_options
    )
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        missing = [name for name in wanted if name not in existing]
        if not missing:
            return []
        response = await admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=replication_factor) for name in missing],
            timeout_ms=int(timeout * 1000),
        )
        created: list[str] = []
        failures: list[str] = []
        for item in response.topic_errors:
            topic, code = item[0], item[1]
            message = item[2] if len(item) > 2 else None
            if code == 0:
                created.append(topic)
            elif code != _TOPIC_ALREADY_EXISTS:
                failures.append(f"{topic}: error {code} {message or ''}".strip())
        if failures:
            raise RuntimeError(f"could not create Kafka topics on {bootstrap}: {'; '.join(failures)}")
        return created
    finally:
        await admin.close()
