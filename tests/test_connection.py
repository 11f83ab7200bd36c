"""Every Essential client is configured alike (persistence/connection.py), against the real dev server."""
from __future__ import annotations

from persistence.connection import shared_client


async def test_clients_poll_the_server_instead_of_streaming_monitors(mongo_uri: str) -> None:
    client = shared_client(mongo_uri)
    assert client.options.server_monitoring_mode == "poll"
    assert client.codec_options.tz_aware
    assert (await client.admin.command("ping"))["ok"] == 1.0
    assert shared_client(mongo_uri) is client  # one per process and loop


async def test_a_uri_that_names_its_monitoring_mode_keeps_it(mongo_uri: str) -> None:
    uri = mongo_uri + ("&" if "?" in mongo_uri else "?") + "serverMonitoringMode=stream"
    client = shared_client(uri)
    assert client.options.server_monitoring_mode == "stream"
    assert (await client.admin.command("ping"))["ok"] == 1.0
