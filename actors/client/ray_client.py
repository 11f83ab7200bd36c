"""The Python client: works from any Ray driver (local, ``ray://``, a Ray Job).

It needs only Ray: every operation goes through the supervisor actor, which it
creates if missing.  Errors come back typed (``UnknownJob``, ``InvalidPayload``,
``SagaNotFound`` ...) with a message that says what to fix.
"""
from __future__ import annotations

import os
from typing import Any

import ray

from essential.actors.loopback import LOOPBACK, bind_ray_to_loopback
from essential.actors.names import GATEWAY_NAME, SINK_NAME, SUPERVISOR_NAME, host_name
from essential.actors.settings import Settings, get_settings
from essential.actors.stack_record import apply_stack_env
from essential.actors.tracing import current_traceparent
from essential.orchestration import Saga, Stage
from essential.orchestration.errors import raise_for_error

CLIENT_SESSION_ATTEMPTS = 3  # ray:// connections whose session the server failed to start


def connect_ray(settings: Settings, address: str | None = None) -> None:
    """Join the configured cluster (or the local stack's head) unless already connected.

    ``address`` (else ``ESSENTIAL_RAY_ADDRESS``, else Ray's own ``RAY_ADDRESS``,
    which Ray Jobs set for their entrypoint) may be a GCS address
    (``host:port``), a Ray Client address (``ray://host:port``) or ``auto``;
    with none, a local Ray is started.

    Loopback: for no address or a 127.0.0.1/localhost one, every Ray process
    this driver talks to must stay on 127.0.0.1 (Ray 2.60 on Linux otherwise
    replaces it with the machine's external address); a remote address is left
    alone, so the same code joins a real cluster from one of its nodes.

    Token authentication (on by default in Ray 2.60): both sides must agree.
    An explicit ``RAY_AUTH_MODE`` is obeyed; otherwise, when joining an
    existing cluster and a token is at hand (``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``), token mode is turned on
    for this process, since a cluster's token is only handed to its clients.
    """
    if ray.is_initialized():
        return
    target = address or settings.ray_address or os.environ.get("RAY_ADDRESS") or None
    client_mode = bool(target) and target.startswith("ray://")
    kwargs: dict[str, Any] = {"namespace": settings.namespace}
    if not client_mode:
        kwargs["log_to_driver"] = False
    if target is None or _is_loopback(target):
        bind_ray_to_loopback()
        if not client_mode:
            kwargs["_node_ip_address"] = LOOPBACK
    if target is not None:
        _agree_on_token_auth()
    _reload_ray_auth_config()
    try:
        for attempt in range(1, CLIENT_SESSION_ATTEMPTS + 1):
            try:
                ray.init(address=target or "local", **kwargs)  # never adopt a stray cluster
                break
            except ConnectionAbortedError:
                # The client server could not start this client's session process (seen under
                # load: it exits at once, and nothing was created); a new connection gets a new one.
                if not client_mode or attempt == CLIENT_SESSION_ATTEMPTS:
                    raise
    except ConnectionError as exc:
        if not client_mode:
            raise
        raise ConnectionError(
            f"could not reach the Ray Client server at {target}: {exc}. Check the address and port "
            f"(the head's --ray-client-server-port, 10001 by default) and that this machine has the "
            f"cluster's token: RAY_AUTH_TOKEN or ~/.ray/auth_token (`ray get-auth-token` on the head prints it); "
            f"RAY_AUTH_MODE is {os.environ.get('RAY_AUTH_MODE', 'unset')!r} here"
        ) from exc


def _is_loopback(address: str) -> bool:
    """``127.0.0.1:6379``, ``ray://localhost:10001``, ``[::1]:6379`` ... (``auto`` is not: its node may be any IP)."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host == "localhost" or host == "::1" or host.startswith("127.")


def _agree_on_token_auth() -> None:
    """Turn on Ray's token mode for this process when a token is available and no mode was chosen."""
    if os.environ.get("RAY_AUTH_MODE"):
        return  # an explicit choice, "token" or "disabled", always wins
    try:
        from ray._raylet import AuthenticationTokenLoader
    except ImportError:  # a Ray without token authentication
        return
    if not AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        return
    os.environ["RAY_AUTH_MODE"] = "token"  # also for the processes this driver starts


def _reload_ray_auth_config() -> None:
    """Make Ray obey the ``RAY_AUTH_MODE`` in the environment *now*.

    Ray reads the mode once, when it is imported; a driver that learns the mode
    afterwards (from the local stack's record, or from :func:`_agree_on_token_auth`)
    would otherwise connect with the mode it had at import and be refused.
    """
    if not os.environ.get("RAY_AUTH_MODE"):
        return
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # a Ray without token authentication
        return
    Config.initialize("")  # what Ray does itself: re-read the configuration from the environment
    AuthenticationTokenLoader.instance().reset_cache()


def get_supervisor(settings: Settings) -> Any:
    """The namespace's supervisor; created if missing (idempotent across clients).

    Looked up by name first, so a client only imports the supervisor's code (and
    PyMongo with it) on the one call that has to create it.
    """
    try:
        return ray.get_actor(SUPERVISOR_NAME, namespace=settings.namespace)
    except ValueError:
        from essential.actors.sagas.supervisor import ensure_supervisor

        return ensure_supervisor(settings)


def stop_deployment(namespace: str, max_hosts: int = 64) -> list[str]:
    """Kill a deployment's long-lived actors (supervisor, gateway, shared hosts, metrics sink).

    Its sagas stay in MongoDB: the next supervisor of that namespace restores them.
    Used between benchmark modes and by tests, so an idle deployment's supervisor
    does not keep sweeping (and loading MongoDB) while the next one is measured.
    """
    stopped = []
    for name in (SUPERVISOR_NAME, GATEWAY_NAME, SINK_NAME, *(host_name(i) for i in range(max_hosts))):
        try:
            ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
            stopped.append(name)
        except ValueError:
            continue
    return stopped


def _default_settings(address: str | None) -> Settings:
    """The environment's settings; with no cluster named anywhere, those of the stack `essential up` recorded.

    So a script run from a fresh shell next to ``essential up`` finds the stack
    without exporting anything (a cluster named by ``address``,
    ``ESSENTIAL_RAY_ADDRESS`` or Ray's own ``RAY_ADDRESS`` always wins).
    """
    named = address or os.environ.get("ESSENTIAL_RAY_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not named and apply_stack_env():
        get_settings.cache_clear()
    return get_settings()


class EssentialClient:
    """Start, watch and abort sagas.

    >>> client = EssentialClient()
    >>> saga_id = client.start("bank:transfer", {"source": "w1", "target": "w2", "amount": 5})
    >>> client.wait(saga_id).state
    <SagaState.COMPLETED: 'completed'>
    """

    def __init__(self, settings: Settings | None = None, *, address: str | None = None) -> None:
        self.settings = settings or _default_settings(address)
        self.address = address
        self.reconnect()

    def reconnect(self) -> None:
        """(Re)join the cluster and find the supervisor, e.g. after the cluster restarted."""
        connect_ray(self.settings, self.address)
        self.supervisor = get_supervisor(self.settings)
        ray.get(self.supervisor.ready.remote())

    def start(
        self,
        job: str,
        payload: dict[str, Any] | None = None,
        *,
        ttl: float | None = None,
        idempotency_key: str | None = None,
        correlation_id: str | None = None,
        traceparent: str | None = None,
    ) -> str:
        """Validate, store and launch a saga; returns its id (the existing one for a known key)."""
        request = {
            "job": job,
            "payload": payload if payload is not None else {},
            "ttl": ttl,
            "idempotency_key": idempotency_key,
            "correlation_id": correlation_id,
            "traceparent": traceparent or current_traceparent(),  # the caller's OpenTelemetry span, if any
        }
        reply = raise_for_error(ray.get(self.supervisor.start.remote(request)))
        return reply["saga"]["id"]

    def start_many(self, requests: list[dict[str, Any]]) -> list[str]:
        """Start a batch concurrently; each request has the keyword names of :meth:`start`."""
        refs = [self.supervisor.start.remote({"payload": {}, **r}) for r in requests]
        return [raise_for_error(reply)["saga"]["id"] for reply in ray.get(refs)]

    def status(self, saga_id: str) -> Saga:
        return Saga.model_validate(raise_for_error(ray.get(self.supervisor.status.remote(saga_id)))["saga"])

    def stages(self, saga_id: str) -> list[Stage]:
        reply = raise_for_error(ray.get(self.supervisor.stages.remote(saga_id)))
        return [Stage.model_validate(s) for s in reply["stages"]]

    def wait(self, saga_id: str, timeout: float = 120.0) -> Saga:
        """Block until the saga is completed, aborted or parked; raises TimeoutError otherwise."""
        saga = Saga.model_validate(raise_for_error(ray.get(self.supervisor.wait.remote(saga_id, timeout)))["saga"])
        if not saga.state.ended:
            raise TimeoutError(f"saga {saga_id} still {saga.state.value} after {timeout:g}s")
        return saga

    def abort(self, saga_id: str, reason: str = "aborted by client") -> Saga:
        """Ask for compensation; honoured between steps. Aborting a completed saga raises."""
        return Saga.model_validate(raise_for_error(ray.get(self.supervisor.abort.remote(saga_id, reason)))["saga"])

    def list(self, *, state: str | None = None, job: str | None = None, limit: int = 50) -> list[Saga]:
        reply = raise_for_error(ray.get(self.supervisor.list.remote(state, job, limit)))
        return [Saga.model_validate(s) for s in reply["sagas"]]

    def resume(self, saga_id: str) -> Saga:
        """Operator: resume a parked saga from its last checkpoint."""
        return Saga.model_validate(raise_for_error(ray.get(self.supervisor.resume.remote(saga_id)))["saga"])

    def sweep(self) -> dict[str, int]:
        """Run one supervisor sweep now (restore, TTL, admission, prune) and return its counts."""
        return ray.get(self.supervisor.sweep.remote())

    def states(self, saga_ids: list[str]) -> dict[str, str]:
        """State of many sagas at once: ``{id: state}``."""
        return ray.get(self.supervisor.states.remote(saga_ids))

    def signal(self, saga_id: str, name: str, payload: Any = None, *, key: str | None = None) -> Saga:
        """Deliver the signal ``name`` (an approval, a callback) to a saga; stored durably first.

        The saga need not be waiting yet, nor have an actor: a ``wait_for`` step
        consumes it when it gets there.  A repeated ``key`` is delivered once.
        Raises ``SagaNotFound``, ``IllegalTransition`` (the saga has ended) or ``InvalidRequest``.
        """
        return Saga.model_validate(raise_for_error(ray.get(self.supervisor.signal.remote(saga_id, name, payload, key)))["saga"])

    # -- recorded sagas ------------------------------------------------------------------------
    @property
    def recorded(self) -> Any:
        """The platform's start / add / commit / abort API: :class:`~essential.actors.client.recorded.RecordedClient`."""
        from essential.actors.client.recorded import RecordedClient

        return RecordedClient(self.supervisor)
