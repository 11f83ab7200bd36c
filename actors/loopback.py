"""Keep every Ray process on 127.0.0.1.

On Linux, Ray 2.60 replaces a loopback ``node_ip_address`` with the machine's
external address (``services.resolve_ip_for_localhost``) unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which makes it fall back to
127.0.0.1.  The constant is read when Ray is imported, so both the environment
(for the raylet and workers we spawn) and the already-imported constant are set.
"""
from __future__ import annotations

import os

LOOPBACK = "127.0.0.1"
ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def bind_ray_to_loopback() -> None:
    os.environ.update(ENV)
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
