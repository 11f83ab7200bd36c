"""Every Essential client is configured alike (persistence/connection.py), against the real dev server."""
from __future__ import annotations

from essential.persistence.connection import new_client, shared_client


async def test_one_tz_aware_client_per_process_and_loop(mongo_uri: str) -> None:
    client = shared_client(mongo_uri)
    assert client.codec_options.tz_aware  # stored datetimes come back comparable with aware ones
    assert (await client.admin.command("ping"))["ok"] == 1.0
    assert shared_client(mongo_uri) is client


async def test_an_owned_client_takes_overrides_on_top_of_the_shared_options(mongo_uri: str) -> None:
    client = new_client(mongo_uri, serverSelectionTimeoutMS=1234)
    try:
        assert client.codec_options.tz_aware
        assert client.options.server_selection_timeout == 1.234
        assert (await client.admin.command("ping"))["ok"] == 1.0
    finally:
        await client.close()
