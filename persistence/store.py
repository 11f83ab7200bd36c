"""The saga store on PyMongo's async API.

Every checkpoint is one multi-document transaction (``with_transaction``, which
retries the transient write conflicts the dev server raises readily) that updates
the saga fenced by its lease epoch, writes the stage, and appends outbox events.

Beyond sagas, stages and the outbox:

* ``signals`` – ``{saga, name, payload, key, at}``, stored when a signal arrives
  (whether or not anything runs the saga); a ``key`` deduplicates redeliveries;
* ``locks`` – bucket locks ``{bucket, key, saga, job, seq, epoch, at, waiters}``,
  unique per (bucket, key), taken in a stage's write-ahead transaction and
  released in the saga's terminal transition.  A lock whose holder has ended
  (or vanished) is free: it never outlives its saga.

Waking a waiting saga sets its ``wake_at`` to now, conditional on it still
waiting; the supervisor relaunches waiting sagas that are due.  The runner
checkpoints ``waiting`` *before* its last look at what it waits for, and every
waker writes what happened *before* it wakes, so a wake-up is never lost.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Awaitable, Callable, ClassVar, TypeVar

from bson import ObjectId
from bson.binary import UUID_SUBTYPE, Binary
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, InsertOne, ReplaceOne, UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import (
    BulkWriteError,
    ClientBulkWriteException,
    ConnectionFailure,
    DuplicateKeyError,
    InvalidOperation,
    OperationFailure,
    PyMongoError,
)

from essential.orchestration.errors import AbortPending, IllegalTransition, LeaseLost, LockBusy, SagaNotFound
from essential.orchestration.lifecycle import check_transition, resumed_state
from essential.orchestration.models import Event, Saga, Signal, Stage
from essential.orchestration.ports import Carried
from essential.orchestration.states import ENDED_STATES, LIVE_STATES, TERMINAL_STATES, SagaState
from essential.persistence.documents import (
    event_to_doc,
    oid,
    plain,
    saga_from_doc,
    saga_to_doc,
    signal_from_doc,
    signal_to_doc,
    stage_from_doc,
    stage_to_doc,
    state_and_job,
)
from essential.persistence.indexes import KEYS, ensure_indexes

log = logging.getLogger("essential.store")
T = TypeVar("T")

#: how long the store keeps retrying while MongoDB is unreachable before giving up
OUTAGE_BUDGET_S = 600.0


def _retryable(exc: PyMongoError) -> bool:
    return isinstance(exc, ConnectionFailure) or exc.has_error_label("TransientTransactionError") or (
        exc.has_error_label("RetryableWriteError")
    )


async def resilient(
    op: Callable[[], Awaitable[T]], what: str, budget: float = OUTAGE_BUDGET_S, *, duplicate_is_success: bool = True
) -> T:
    """Run ``op``, riding out a MongoDB outage (restart, failover) for up to ``budget`` seconds.

    A duplicate-key error on a *retry* means the earlier attempt committed before
    its acknowledgement was lost (every checkpoint inserts a uniquely keyed stage
    or outbox row), so it counts as success — unless ``duplicate_is_success`` is
    off, for writes where someone else's row can collide too (a saga's
    idempotency key): those callers find out whose row it is.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget
    delay, attempt = 0.1, 0
    while True:
        attempt += 1
        try:
            return await op()
        except DuplicateKeyError:
            if attempt > 1 and duplicate_is_success:
                return None  # type: ignore[return-value]
            raise
        except PyMongoError as exc:
            if not _retryable(exc) or loop.time() >= deadline:
                raise
            log.warning("MongoDB unavailable during %s (%s); retrying in %.1fs", what, type(exc).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


class _LockRace(Exception):
    """Another transaction inserted the lock between our read and our insert: read again."""


class _Stale(Exception):
    """A one-command checkpoint's fence missed: someone else wrote the saga since this process
    last did.  The transaction is rolled back and made again the reading way."""


def _bulk_error(exc: ClientBulkWriteException, fence_held: bool) -> Exception:
    """What a failed ``bulkWrite`` means to the store: the server's own error (a write conflict keeps
    its TransientTransactionError label, so the transaction is retried), a duplicate key — which
    counts only when the saga's fence held; otherwise the saga moved on and its checkpoint is redone."""
    if exc.error is not None:
        return exc.error
    first = (exc.write_errors or [{}])[0]
    if first.get("code") == 11000:
        if not fence_held:
            return _Stale()
        return DuplicateKeyError(first.get("errmsg", "duplicate key"), 11000, first)
    return exc


def lock_label(bucket: str, key: str) -> str:
    """``waiting_for`` of a saga waiting for a bucket lock."""
    return f"lock:{bucket}:{key}"


def parse_lock_label(label: str | None) -> tuple[str, str] | None:
    """``(bucket, key)`` of a :func:`lock_label` (a bucket never holds a colon), else None."""
    if not label or not label.startswith("lock:"):
        return None
    bucket, sep, key = label[len("lock:"):].partition(":")
    return (bucket, key) if sep else None


def _utcnow() -> datetime:
    now = datetime.now(timezone.utc)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def _session_hex(session: AsyncClientSession) -> str:
    raw = session.session_id["id"]
    return str(uuid.UUID(bytes=bytes(raw)))


@dataclass
class _Known:
    """The saga fields a fenced write reports back, as this process last saw them."""

    FIELDS: ClassVar[dict[str, int]] = {"events": 1, "abort_requested": 1, "parent": 1, "job": 1, "locks_held": 1}

    epoch: int
    events: int
    abort_requested: str | None
    parent: Any
    job: str | None
    locks_held: bool

    @classmethod
    def of(cls, epoch: int, doc: dict[str, Any]) -> _Known:
        return cls(epoch, int(doc.get("events", 0)), doc.get("abort_requested"), doc.get("parent"),
                   doc.get("job"), bool(doc.get("locks_held")))  # fmt: skip

    def wrote(self, fields: dict[str, Any], added_events: int) -> None:
        self.events += added_events
        self.locks_held = self.locks_held or bool(fields.get("locks_held"))
        if "abort_requested" in fields:
            self.abort_requested = fields["abort_requested"]

    def as_doc(self) -> dict[str, Any]:
        return {"events": self.events, "abort_requested": self.abort_requested, "parent": self.parent,
                "job": self.job, "locks_held": self.locks_held}  # fmt: skip


class MongoSagaStore:
    """Implements :class:`essential.orchestration.ports.SagaStore` on one database."""

    def __init__(self, client: AsyncMongoClient, database: str = "essential") -> None:
        self.client = client
        self.db = client[database]
        self.sagas = self.db["sagas"]
        self.stages_col = self.db["stages"]
        self.outbox = self.db["outbox"]
        self.signals_col = self.db["signals"]
        self.locks = self.db["locks"]
        self.quarantine_col = self.db["quarantine"]  # saga documents that do not read as sagas
        self.keys = self.db[KEYS]  # idempotency key -> saga (see essential.persistence.indexes)
        # One logical session per saga being driven here: its id is the saga's
        # ``session`` field, and a runner uses it strictly sequentially.
        self._sessions: dict[str, AsyncClientSession] = {}
        # What this process last wrote to each saga it holds the lease of (see _known_update)
        self._known: dict[str, _Known] = {}
        # a checkpoint's writes to sagas, outbox and stages go as one bulkWrite command (MongoDB 8+);
        # False once the server turns out older: one command per collection
        self._one_command = True
        self._ns = {name: f"{self.db.name}.{name}" for name in ("sagas", "outbox", "stages", KEYS)}

    async def ensure_indexes(self) -> None:
        await resilient(lambda: ensure_indexes(self.db), "create indexes")

    # -- transactions --------------------------------------------------------------
    async def in_transaction(
        self, saga_id: str, body: Callable[[AsyncClientSession], Awaitable[Any]], what: str = "checkpoint of saga"
    ) -> Any:
        """One transaction, on the saga's own session when this process holds its lease (the recorded store too)."""

        async def once() -> Any:
            session = self._sessions.get(saga_id)
            if session is not None and not session.in_transaction:
                return await session.with_transaction(body)
            async with self.client.start_session(causal_consistency=False) as fresh:
                return await fresh.with_transaction(body)

        try:
            return await resilient(once, f"{what} {saga_id}")
        except _Stale:
            self._known.pop(saga_id, None)  # the fence missed: read what the saga is now, then decide
            return await resilient(once, f"{what} {saga_id}")

    async def fenced_update(
        self,
        session: AsyncClientSession,
        saga_id: str,
        epoch: int,
        fields: dict[str, Any],
        events: list[Event],
        *,
        unless_abort: bool = False,
        carried: Sequence[Carried] = (),
        started: Sequence[dict[str, Any]] = (),
    ) -> dict[str, Any]:
        """Inside a transaction: update the saga if ``epoch`` still holds its lease, and append
        ``events`` to the outbox with the saga's next event numbers (the recorded store too).

        ``carried``: checkpoints the runner folded into this one — their saga fields and
        events go first, their finished stages are written in the same transaction.
        ``started``: stage documents written ahead in it (inserted: a seq is never recorded twice);
        they and the carried stages go to the server as one command."""
        for _, carried_fields, carried_events in reversed(carried):
            fields, events = {**carried_fields, **fields}, carried_events + events
        update: dict[str, Any] = {"$set": plain(fields)}
        if events:
            update["$inc"] = {"events": len(events)}
        finished = [c[0] for c in carried if c[0] is not None]
        doc = await self._checkpoint_in_one_command(
            session, saga_id, epoch, fields, update, events, finished, started, unless_abort
        )
        if doc is not None:
            return doc
        # update_one (+ a read only when needed), never find_one_and_update: on the dev server
        # findAndModify scans the whole collection, so its cost grows with every saga ever stored.
        doc = await self._known_update(session, saga_id, epoch, fields, update, len(events), unless_abort)
        if doc is None:
            fence: dict[str, Any] = {"_id": oid(saga_id), "lease.epoch": epoch}
            if unless_abort:
                fence["abort_requested"] = None
            if (await self.sagas.update_one(fence, update, session=session)).matched_count:
                # in the transaction the read sees this write, and a concurrent writer conflicts
                doc = await self.sagas.find_one({"_id": oid(saga_id)}, _Known.FIELDS, session=session)
                if doc is not None:
                    self._known[saga_id] = _Known.of(epoch, doc)
        if doc is None:
            self._known.pop(saga_id, None)
            if unless_abort:
                leased = await self.sagas.find_one(
                    {"_id": oid(saga_id), "lease.epoch": epoch}, {"abort_requested": 1}, session=session
                )
                if leased is not None and leased.get("abort_requested"):
                    raise AbortPending(saga_id, leased["abort_requested"])
            raise LeaseLost(saga_id, epoch)
        if events:
            first = doc["events"] - len(events) + 1
            await self.outbox.insert_many(
                [event_to_doc(ev, first + i) for i, ev in enumerate(events)], session=session
            )
        await self.write_stages(session, saga_id, finished, started)
        return doc

    def _refused(self, exc: OperationFailure) -> Exception:
        """A server that has bulkWrite but refuses a field of it (code 40415, IDLUnknownField):
        from now on one command per collection, and this transaction is made again that way."""
        if exc.code == 40415:
            log.warning("the server refused a bulkWrite (%s); writing one command per collection", exc)
            self._one_command = False
            return _Stale()
        return exc

    async def _checkpoint_in_one_command(
        self,
        session: AsyncClientSession,
        saga_id: str,
        epoch: int,
        fields: dict[str, Any],
        update: dict[str, Any],
        events: list[Event],
        finished: Sequence[Stage],
        started: Sequence[dict[str, Any]],
        unless_abort: bool,
    ) -> dict[str, Any] | None:
        """The whole checkpoint — the fenced saga update, its outbox events, its stages — as one
        ``bulkWrite`` command, when this process knows the saga (so the event numbers are known
        before the write).  None: not possible here (the caller writes collection by collection);
        _Stale: the fence missed, so the transaction must be rolled back and made again."""
        known = self._known.get(saga_id)
        if not self._one_command or known is None or known.epoch != epoch:
            return None
        if unless_abort and known.abort_requested is not None:
            return None
        saga = oid(saga_id)
        fence = {"_id": saga, "lease.epoch": epoch, "events": known.events, "abort_requested": known.abort_requested}
        ops: list[Any] = [UpdateOne(fence, update, namespace=self._ns["sagas"])]
        ops += [InsertOne(event_to_doc(ev, known.events + 1 + i), namespace=self._ns["outbox"]) for i, ev in enumerate(events)]
        ops += [ReplaceOne({"saga": saga, "seq": stage.seq}, stage_to_doc(stage), upsert=True, namespace=self._ns["stages"])
                for stage in finished]  # fmt: skip
        ops += [InsertOne(dict(doc), namespace=self._ns["stages"]) for doc in started]  # a seq stored already: 11000
        try:
            result = await self.client.bulk_write(ops, session=session, ordered=True, verbose_results=True)
        except InvalidOperation:  # a server before MongoDB 8 has no bulkWrite command
            self._one_command = False
            return None
        except ClientBulkWriteException as exc:  # (an OperationFailure too: caught first)
            partial = exc.partial_result
            held = partial is not None and bool(getattr(partial.update_results.get(0), "matched_count", 0))
            raise _bulk_error(exc, held) from exc
        except OperationFailure as exc:
            raise self._refused(exc) from exc
        if not result.update_results[0].matched_count:
            raise _Stale(saga_id)
        known.wrote(fields, len(events))  # a transaction that aborts later only costs a read next time
        return known.as_doc()

    async def write_stages(
        self, session: AsyncClientSession, saga_id: str, finished: Sequence[Stage], started: Sequence[dict[str, Any]]
    ) -> None:
        """Record finished stages (replacing their started documents) and insert started ones.

        One ``update`` command for all of them (an insert among updates would be a second): a
        started stage is an upsert whose filter names a fresh ``_id``, so it can only insert, and
        one whose seq is already stored breaks the unique (saga, seq) index, as an insert would."""
        saga = oid(saga_id)
        writes: list[ReplaceOne] = [
            ReplaceOne({"saga": saga, "seq": stage.seq}, stage_to_doc(stage), upsert=True) for stage in finished
        ]
        writes += [ReplaceOne({"_id": ObjectId(), "saga": saga, "seq": doc["seq"]}, doc, upsert=True) for doc in started]
        if not writes:
            return
        try:
            await self.stages_col.bulk_write(writes, ordered=True, session=session)
        except BulkWriteError as exc:
            first = (exc.details.get("writeErrors") or [{}])[0]
            if first.get("code") == 11000:
                raise DuplicateKeyError(first.get("errmsg", "a stage seq is stored already"), 11000, first) from exc
            raise

    async def _known_update(
        self,
        session: AsyncClientSession,
        saga_id: str,
        epoch: int,
        fields: dict[str, Any],
        update: dict[str, Any],
        added_events: int,
        unless_abort: bool,
    ) -> dict[str, Any] | None:
        """The write in one command when this process knows the saga: the fence states everything
        assumed (epoch, event count, abort request), so a match proves the assumptions; None sends
        the caller to the reading path (first write after the lease, or someone else wrote)."""
        known = self._known.get(saga_id)
        if known is None or known.epoch != epoch or (unless_abort and known.abort_requested is not None):
            return None
        fence = {"_id": oid(saga_id), "lease.epoch": epoch, "events": known.events,
                 "abort_requested": known.abort_requested}  # fmt: skip
        if not (await self.sagas.update_one(fence, update, session=session)).matched_count:
            return None
        known.wrote(fields, added_events)  # a transaction that aborts later only costs a read next time
        return known.as_doc()

    # -- SagaStore ---------------------------------------------------------------------
    async def insert_started(self, doc: dict[str, Any], event: Event, what: str = "create saga") -> None:
        """Insert a new saga's document with its ``saga.started`` event, one transaction
        (DuplicateKeyError: the id or idempotency key is taken; the caller decides whose it is)."""
        doc["events"] = 1
        key = doc.get("idempotency_key")

        async def body(session: AsyncClientSession) -> None:
            rows = [("sagas", dict(doc))]
            if isinstance(key, str):  # a taken key fails the whole start (DuplicateKeyError)
                rows.append((KEYS, {"_id": key, "saga": doc["_id"]}))
            rows.append(("outbox", event_to_doc(event, 1)))
            if self._one_command:
                try:
                    ops = [InsertOne(row, namespace=self._ns[name]) for name, row in rows]
                    await self.client.bulk_write(ops, session=session, ordered=True)
                    return
                except InvalidOperation:  # a server before MongoDB 8: one insert per collection
                    self._one_command = False
                except ClientBulkWriteException as exc:  # (an OperationFailure too: caught first)
                    raise _bulk_error(exc, True) from exc
                except OperationFailure as exc:
                    raise self._refused(exc) from exc
            for name, row in rows:
                await self.db[name].insert_one(row, session=session)

        async def once() -> None:
            async with self.client.start_session(causal_consistency=False) as session:
                await session.with_transaction(body)

        try:
            await resilient(once, what, budget=30.0, duplicate_is_success=False)
        except _Stale:  # the server refused the one-command form: one insert per collection
            await resilient(once, what, budget=30.0, duplicate_is_success=False)

    async def create(self, saga: Saga, event: Event) -> tuple[Saga, bool]:
        doc = saga_to_doc(saga)
        try:
            await self.insert_started(doc, event)
            return saga, True
        except DuplicateKeyError:
            pass  # this id or this idempotency key is stored already: whose row it is decides
        mine = await resilient(lambda: self.sagas.find_one({"_id": doc["_id"]}), "read saga")
        if mine is not None:  # our own earlier attempt committed before its acknowledgement was lost
            return saga_from_doc(mine), True
        existing = None
        if saga.idempotency_key is not None:
            existing = await self.doc_by_key(saga.idempotency_key)
        if existing is None:
            raise DuplicateKeyError(f"saga {saga.id} collides with a stored saga")
        return saga_from_doc(existing), False

    async def get(self, saga_id: str) -> Saga:
        return saga_from_doc(await self.saga_doc(saga_id))

    async def saga_doc(self, saga_id: str) -> dict[str, Any]:
        """The stored document of a saga (SagaNotFound for an unknown or malformed id)."""
        try:
            key = oid(saga_id)
        except Exception:
            raise SagaNotFound(str(saga_id)) from None
        doc = await resilient(lambda: self.sagas.find_one({"_id": key}), "read saga")
        if doc is None:
            raise SagaNotFound(saga_id)
        return doc

    async def stages(self, saga_id: str) -> list[Stage]:
        async def read() -> list[Stage]:
            cursor = self.stages_col.find({"saga": oid(saga_id)}).sort("seq", ASCENDING)
            return [stage_from_doc(d) async for d in cursor]

        return await resilient(read, "read stages")

    async def reclaim(self, saga_id: str) -> bool:
        """End a transaction that a dead runner left open on the saga; True when one was killed.

        A runner killed inside a checkpoint leaves its transaction open on the server,
        and every other write to the documents it touched waits behind it (measured on
        the dev server: indefinitely; MongoDB waits up to transactionLifetimeLimitSeconds)
        — the new lease, the restore count, an abort.  The runner's logical session id
        is the saga's ``session`` field; killing that session aborts the transaction at
        once.  Reads are not blocked, so reading the field first is safe.  A runner that
        is in fact alive only loses that transaction and then its lease (fencing).
        """
        doc = await resilient(lambda: self.sagas.find_one({"_id": oid(saga_id)}, {"session": 1}), "read session")
        return await self._end_session_of(saga_id, (doc or {}).get("session"))

    async def _end_session_of(self, saga_id: str, session_id: str | None) -> bool:
        """``killSessions`` on the session a saga's last runner used (see :meth:`reclaim`)."""
        if not session_id:
            return False
        lsid = {"id": Binary(uuid.UUID(session_id).bytes, UUID_SUBTYPE)}
        try:
            await resilient(lambda: self.client.admin.command("killSessions", [lsid]), "end an orphaned session")
        except OperationFailure as exc:  # e.g. a user without the privilege: the server's own expiry remains
            log.warning("could not end the orphaned session of saga %s: %s", saga_id, exc)
            return False
        return True

    async def acquire_lease(self, saga_id: str, owner: str) -> Saga:
        old = self._sessions.pop(saga_id, None)
        if old is not None:
            await old.end_session()
        # not causally consistent: every read and write goes to the primary, and a transaction's
        # first command then carries no read concern (the dev server's bulkWrite takes none)
        session = self.client.start_session(causal_consistency=False)
        try:
            saga = await resilient(lambda: self._raise_epoch(saga_id, owner, _session_hex(session)), "lease")
        except SagaNotFound:
            await session.end_session()
            raise
        if saga.state in TERMINAL_STATES:
            await session.end_session()
        else:
            self._sessions[saga_id] = session
        return saga

    #: what a lease taker's compare-and-set states besides the epoch: every write a runner makes
    #: changes at least one of them, so a taker never goes on from a read that a commit overtook
    LEASE_FENCE: ClassVar[tuple[str, ...]] = ("updatedAt", "events", "seq", "cursor", "state", "abort_requested")

    async def _raise_epoch(self, saga_id: str, owner: str, session_hex: str) -> Saga:
        """Take the lease by compare-and-set (two indexed commands; see fenced_update for why not
        findAndModify): of two racing takers exactly one moves epoch e to e + 1, and only from
        the saga exactly as it read it — the previous holder may commit between the read and
        the set (its transaction retried after its session was ended), and the taker must then
        read again rather than continue from a stale cursor. A predecessor killed
        mid-checkpoint must not block it: its session is ended first."""
        reclaimed = False
        delay = 0.005
        while True:
            doc = await self.sagas.find_one({"_id": oid(saga_id)})
            if doc is None:
                raise SagaNotFound(saga_id)
            if not reclaimed:
                reclaimed = True
                await self._end_session_of(saga_id, doc.get("session"))
            seen = (doc.get("lease") or {}).get("epoch")  # None: never leased (matches a missing field)
            epoch = int(seen or 0)
            fence = {"_id": doc["_id"], "lease.epoch": seen, **{f: doc.get(f) for f in self.LEASE_FENCE}}
            taken = await self.sagas.update_one(
                fence, {"$set": {"lease.epoch": epoch + 1, "lease.owner": owner, "session": session_hex}}
            )
            if not taken.matched_count:
                await asyncio.sleep(delay)  # the holder wrote meanwhile: read again
                delay = min(delay * 2, 0.2)
                continue
            if taken.matched_count:
                doc.setdefault("lease", {}).update(epoch=epoch + 1, owner=owner)
                doc["session"] = session_hex
                self._known[saga_id] = _Known.of(epoch + 1, doc)
                return saga_from_doc(doc)

    async def release(self, saga_id: str) -> None:
        """Forget the saga's session (the runner is done with it)."""
        self._known.pop(saga_id, None)
        session = self._sessions.pop(saga_id, None)
        if session is not None:
            await session.end_session()

    async def write_ahead(
        self,
        saga_id: str,
        epoch: int,
        stage: Stage,
        fields: dict[str, Any],
        *,
        locks: Sequence[tuple[str, str]] = (),
        carried: Sequence[Carried] = (),
        unless_abort: bool = False,
    ) -> str | None:
        stage_doc = stage_to_doc(stage)

        # ``locks_held`` tells the terminal transition to look for locks to release (most sagas have none)
        update = {**fields, "locks_held": True} if locks else fields

        async def body(session: AsyncClientSession) -> str | None:
            doc = await self.fenced_update(
                session, saga_id, epoch, update, [], unless_abort=unless_abort, carried=carried, started=[stage_doc]
            )
            if locks:
                await self._take_locks(session, saga_id, doc.get("job"), epoch, stage.seq, locks)
            return doc.get("abort_requested")

        for _ in range(5):
            try:
                return await self.in_transaction(saga_id, body)
            except _LockRace:
                continue  # a concurrent taker committed first: the next read sees who holds it
        bucket, key = locks[0]
        raise LockBusy(bucket, key, None)

    async def write_ahead_many(
        self,
        saga_id: str,
        epoch: int,
        stages: list[Stage],
        fields: dict[str, Any],
        *,
        carried: Sequence[Carried] = (),
        unless_abort: bool = False,
    ) -> str | None:
        docs = [stage_to_doc(s) for s in stages]

        async def body(session: AsyncClientSession) -> str | None:
            doc = await self.fenced_update(
                session, saga_id, epoch, fields, [], unless_abort=unless_abort, carried=carried, started=docs
            )
            return doc.get("abort_requested")

        return await self.in_transaction(saga_id, body)

    async def commit_with(
        self,
        saga_id: str,
        epoch: int,
        work: Callable[[AsyncClientSession], Awaitable[Carried]],
        *,
        carried: Sequence[Carried] = (),
        unless_abort: bool = False,
    ) -> str | None:
        """A transactional step: ``work`` writes with the saga's session and returns its checkpoint;
        both commit in this one fenced transaction (``unless_abort``: refused, all rolled back,
        after a durable abort — a forward step's, not an undo's).

        A step's timeout cancels it inside the transaction: the transaction is aborted before the
        cancellation goes on, so the saga's session never keeps a half-done step open."""

        async def body(session: AsyncClientSession) -> str | None:
            checkpoint = await work(session)
            doc = await self.fenced_update(
                session, saga_id, epoch, {}, [], unless_abort=unless_abort, carried=[*carried, checkpoint]
            )
            return doc.get("abort_requested")

        try:
            return await self.in_transaction(saga_id, body, "transactional step of saga")
        except asyncio.CancelledError:
            session = self._sessions.get(saga_id)
            if session is not None and session.in_transaction:
                await session.abort_transaction()
            raise

    async def record_result(
        self,
        saga_id: str,
        epoch: int,
        stage: Stage,
        fields: dict[str, Any],
        events: list[Event],
        *,
        carried: Sequence[Carried] = (),
    ) -> str | None:
        async def body(session: AsyncClientSession) -> str | None:
            doc = await self.fenced_update(session, saga_id, epoch, fields, events, carried=[*carried, (stage, {}, [])])
            return doc.get("abort_requested")

        return await self.in_transaction(saga_id, body)

    async def transition(
        self, saga_id: str, epoch: int, fields: dict[str, Any], events: list[Event], *, carried: Sequence[Carried] = ()
    ) -> str | None:
        state = SagaState(fields["state"]) if "state" in fields else None
        terminal = state in TERMINAL_STATES
        lock_wait = parse_lock_label(fields.get("waiting_for")) if state == SagaState.WAITING else None

        async def body(session: AsyncClientSession) -> str | None:
            doc = await self.fenced_update(session, saga_id, epoch, fields, events, carried=carried)
            if lock_wait is not None:
                await self._register_lock_wait(session, saga_id, *lock_wait)
            if terminal:
                await self._release_and_wake(session, saga_id, doc)
            return doc.get("abort_requested")

        flag = await self.in_transaction(saga_id, body)
        if terminal:
            await self.release(saga_id)
        return flag

    async def _register_lock_wait(self, session: AsyncClientSession, saga_id: str, bucket: str, key: str) -> None:
        """In the transaction that checkpoints a saga ``waiting`` for a lock: wait on whoever holds it *now*.

        The saga may have met another holder first (the lock changed hands while it
        lingered): registering here, atomically with the checkpoint, is what makes the
        holder's release wake it. A lock that is free already makes the saga due at once.
        """
        me = oid(saga_id)
        held = await self.locks.find_one({"bucket": bucket, "key": key}, session=session)
        if held is not None and held["saga"] != me and not (await self._holder_ended(session, held["saga"]))[0]:
            await self.locks.update_one({"_id": held["_id"]}, {"$addToSet": {"waiters": me}}, session=session)
            return
        await self.sagas.update_one({"_id": me}, {"$set": {"wake_at": _utcnow()}}, session=session)

    async def _release_and_wake(self, session: AsyncClientSession, saga_id: str, doc: dict[str, Any]) -> None:
        """In the saga's terminal transaction: free its locks and wake who waits for them or for it.

        Inside the transaction, so a process that dies right after the commit cannot
        lose the wake-up (the waiters would otherwise sleep until their TTL)."""
        now = _utcnow()
        if doc.get("locks_held"):
            held = [d async for d in self.locks.find({"saga": oid(saga_id)}, session=session)]
            if held:
                await self.locks.delete_many({"saga": oid(saga_id)}, session=session)
            for lock in held:
                label = lock_label(lock["bucket"], lock["key"])
                for waiter in lock.get("waiters") or []:
                    await self.sagas.update_one(
                        {"_id": waiter, "state": SagaState.WAITING.value, "waiting_for": label},
                        {"$set": {"wake_at": now}}, session=session,
                    )  # fmt: skip
        if doc.get("parent") is not None:
            await self.sagas.update_one(
                {"_id": oid(str(doc["parent"])), "state": SagaState.WAITING.value, "waiting_for": f"child:{saga_id}"},
                {"$set": {"wake_at": now}}, session=session,
            )  # fmt: skip

    # -- bucket locks ------------------------------------------------------------------
    async def _holder_ended(self, session: AsyncClientSession | None, holder: Any) -> tuple[bool, dict[str, Any]]:
        doc = await self.sagas.find_one({"_id": holder}, {"state": 1, "job": 1}, session=session)
        return doc is None or doc.get("state") in {s.value for s in TERMINAL_STATES}, doc or {}

    async def _take_locks(
        self,
        session: AsyncClientSession,
        saga_id: str,
        job: str | None,
        epoch: int,
        seq: int,
        claims: Sequence[tuple[str, str]],
    ) -> None:
        me = oid(saga_id)
        now = _utcnow()
        for bucket, key in claims:
            held = await self.locks.find_one({"bucket": bucket, "key": key}, session=session)
            mine = {"saga": me, "job": job, "seq": seq, "epoch": epoch, "at": now}
            if held is None:
                try:
                    await self.locks.insert_one({"bucket": bucket, "key": key, "waiters": [], **mine}, session=session)
                except DuplicateKeyError:
                    raise _LockRace() from None
                continue
            if held["saga"] == me:
                continue  # ours already (a re-run of the stage, or an earlier step took it)
            ended, holder = await self._holder_ended(session, held["saga"])
            if not ended:
                raise LockBusy(bucket, key, str(held["saga"]), holder.get("job"), holder.get("state"))
            # its saga ended without releasing it (pruned, or edited by hand): it is free
            await self.locks.update_one(
                {"_id": held["_id"], "saga": held["saga"]}, {"$set": mine, "$pull": {"waiters": me}}, session=session
            )

    async def lock_free(self, bucket: str, key: str, saga_id: str) -> bool:
        held = await resilient(lambda: self.locks.find_one({"bucket": bucket, "key": key}), "read lock")
        if held is None or held["saga"] == oid(saga_id):
            return True
        ended, _ = await self._holder_ended(None, held["saga"])
        return ended

    async def add_lock_waiter(self, bucket: str, key: str, saga_id: str) -> bool:
        me = oid(saga_id)
        res = await resilient(
            lambda: self.locks.update_one(
                {"bucket": bucket, "key": key, "saga": {"$ne": me}}, {"$addToSet": {"waiters": me}}
            ),
            "wait for lock",
        )
        return res.matched_count == 1

    async def remove_lock_waiter(self, bucket: str, key: str, saga_id: str) -> None:
        """A waiter that took the lock, gave up or stopped: its stale entry would read as a wait."""
        await resilient(
            lambda: self.locks.update_one({"bucket": bucket, "key": key}, {"$pull": {"waiters": oid(saga_id)}}),
            "stop waiting for lock",
        )

    async def lock_cycle(self, bucket: str, key: str, saga_id: str, max_hops: int = 64) -> list[str] | None:
        """Would ``saga_id`` (registered as a waiter of this lock) wait for itself? The chain, else None.

        Walks "S waits for the holder of a lock whose waiters include S" from this
        lock's holder; reaching ``saga_id`` again is a deadlock. The walk reads
        committed waiters only: of two sagas closing a cycle at the same moment the
        later one always sees the other's registration (both may, then both give way).
        """
        me = oid(saga_id)
        held = await resilient(lambda: self.locks.find_one({"bucket": bucket, "key": key}, {"saga": 1}), "read lock")
        if held is None or held["saga"] == me:
            return None
        chain: list[Any] = [held["saga"]]
        seen = {held["saga"]}
        frontier = {held["saga"]}
        for _ in range(max_hops):
            locks = [d async for d in self.locks.find({"waiters": {"$in": list(frontier)}}, {"saga": 1})]
            holders = {d["saga"] for d in locks}
            if me in holders:
                return [str(s) for s in chain]
            frontier = {h for h in holders if h not in seen and not (await self._holder_ended(None, h))[0]}
            if not frontier:
                return None
            seen |= frontier
            chain.extend(sorted(frontier))
        return None

    # -- waking waiting sagas ----------------------------------------------------------
    async def wake(self, saga_id: str, waiting_for: str | None = None) -> bool:
        query: dict[str, Any] = {"_id": oid(saga_id), "state": SagaState.WAITING.value}
        if waiting_for is not None:
            query["waiting_for"] = waiting_for
        res = await resilient(lambda: self.sagas.update_one(query, {"$set": {"wake_at": _utcnow()}}), "wake saga")
        return res.modified_count == 1

    async def list_due(self, now: datetime, limit: int = 500) -> list[Saga]:
        """Waiting sagas to relaunch: their signal, child or lock came, or their timer or TTL is due."""
        cursor = (
            self.sagas.find({"state": SagaState.WAITING.value, "wake_at": {"$lte": now}})
            .sort("wake_at", ASCENDING)
            .limit(limit)
        )
        return await self._readable(cursor)

    async def wake_stranded(self, now: datetime, settle: timedelta, limit: int = 100) -> int:
        """Wake waiting sagas whose lock, child or signal came but whose wake-up never landed.

        A safety net behind the in-transaction wake-ups: a runner that died between its
        ``waiting`` checkpoint and its last look, a lock edited by hand. Each saga is
        looked at once per ``settle`` (``stranded_checked_at``), oldest first, at most
        ``limit`` per call; waking one that is not due only costs a relaunch that parks again.
        """
        before = now - settle
        query = {"state": SagaState.WAITING.value, "wake_at": {"$gt": now}, "updatedAt": {"$lt": before},
                 "$or": [{"stranded_checked_at": None}, {"stranded_checked_at": {"$lt": before}}]}  # fmt: skip
        docs = [d async for d in self.sagas.find(query, {"waiting_for": 1}).sort("updatedAt", ASCENDING).limit(limit)]
        woken = 0
        for doc in docs:
            saga_id = str(doc["_id"])
            if await self._arrived(saga_id, doc.get("waiting_for") or ""):
                woken += await self.wake(saga_id, doc.get("waiting_for"))
        if docs:
            await self.sagas.update_many({"_id": {"$in": [d["_id"] for d in docs]}}, {"$set": {"stranded_checked_at": now}})
        return woken

    async def _arrived(self, saga_id: str, label: str) -> bool:
        """Has what a waiting saga waits for happened (``lock:``/``child:``/``signal:`` labels)?"""
        lock = parse_lock_label(label)
        if lock is not None:
            return await self.lock_free(lock[0], lock[1], saga_id)
        if label.startswith("child:"):
            child = await self.sagas.find_one({"_id": oid(label[len("child:"):])}, {"state": 1})
            return child is None or child.get("state") in {s.value for s in TERMINAL_STATES}
        if label.startswith("signal:"):
            name = label[len("signal:"):]
            consumed = {s.meta.signal_id for s in await self.stages(saga_id) if s.meta.signal_id}
            return any(signal.id not in consumed for signal in await self.signals(saga_id, name))
        return False

    # -- signals -----------------------------------------------------------------------
    async def deliver_signal(
        self, saga_id: str, name: str, payload: Any = None, *, key: str | None = None
    ) -> tuple[Saga, bool]:
        """Store a signal for the saga (durably, first), then wake it if it waits for it.

        Returns the saga (after the wake-up) and whether the signal is new (a
        repeated ``key`` is ignored).  A saga that has ended refuses signals.
        """
        saga = await self.get(saga_id)
        if saga.state in TERMINAL_STATES:
            raise IllegalTransition(
                f"saga {saga_id} is {saga.state.value}; signal {name!r} can no longer be delivered"
            )
        signal = Signal(saga=saga_id, name=name, payload=payload, key=key, at=_utcnow())
        doc = signal_to_doc(signal)

        async def body(session: AsyncClientSession) -> bool:
            # stored and woken in one transaction: a deliverer that dies in between loses nothing
            await self.signals_col.insert_one(dict(doc), session=session)
            woke = await self.sagas.update_one(
                {"_id": oid(saga_id), "state": SagaState.WAITING.value, "waiting_for": f"signal:{name}"},
                {"$set": {"wake_at": signal.at}}, session=session,
            )  # fmt: skip
            return woke.modified_count == 1

        async def once() -> bool:
            async with self.client.start_session() as session:
                return await session.with_transaction(body)

        try:
            woke = await resilient(once, "store signal")
            created = True
        except DuplicateKeyError:  # a repeated key: stored (and its wake-up made) the first time
            woke, created = False, False
        if woke:
            return await self.get(saga_id), created
        return saga, created

    async def signals(self, saga_id: str, name: str) -> list[Signal]:
        async def read() -> list[Signal]:
            cursor = self.signals_col.find({"saga": oid(saga_id), "name": name}).sort([("at", ASCENDING), ("_id", ASCENDING)])
            return [signal_from_doc(d) async for d in cursor]

        return await resilient(read, "read signals")

    # -- child sagas -------------------------------------------------------------------
    async def doc_by_key(self, key: str) -> dict[str, Any] | None:
        """The stored document of the saga started with idempotency key ``key``, if any."""
        row = await resilient(lambda: self.keys.find_one({"_id": key}), "read idempotency key")
        if row is None:
            return None
        return await resilient(lambda: self.sagas.find_one({"_id": row["saga"]}), "read saga by key")

    async def by_idempotency_key(self, key: str) -> Saga | None:
        doc = await self.doc_by_key(key)
        return None if doc is None else saga_from_doc(doc)

    async def reopen_for_compensation(self, saga_id: str, reason: str) -> Saga:
        """A completed child whose parent compensates goes back to ``compensating`` (no actor:
        the supervisor restores it like any saga whose actor is gone)."""
        check_transition(SagaState.COMPLETED, SagaState.COMPENSATING)
        await resilient(
            lambda: self.sagas.update_one(
                {"_id": oid(saga_id), "state": SagaState.COMPLETED.value, "parent": {"$ne": None}},
                {"$set": {"state": SagaState.COMPENSATING.value, "error": reason, "abort_requested": reason,
                          "updatedAt": _utcnow(), "restore_attempts": 0},
                 "$inc": {"lease.epoch": 1}},  # fmt: skip
            ),
            "reopen child saga",
        )
        return await self.get(saga_id)

    async def request_abort(self, saga_id: str, reason: str) -> Saga:
        saga = await self.get(saga_id)
        if saga.state == SagaState.COMPLETED:
            raise IllegalTransition(f"saga {saga_id} already completed; it cannot be aborted")
        if saga.state == SagaState.PARKED:
            return await self.resume(saga_id, abort_reason=reason)
        if saga.state in (SagaState.ABORTED, SagaState.COMPENSATING) or saga.abort_requested:
            return saga
        requested = await self.sagas.update_one(
            {"_id": oid(saga_id), "state": {"$in": [s.value for s in LIVE_STATES | {SagaState.PARKED}]},
             "abort_requested": None},
            {"$set": {"abort_requested": reason}},
        )
        saga = await self.get(saga_id)
        if not requested.matched_count:  # raced with a transition; report what it is now
            return saga
        if saga.state == SagaState.WAITING and await self.wake(saga_id):
            return await self.get(saga_id)  # due now: relaunched to compensate
        return saga

    async def list(
        self,
        *,
        state: SagaState | str | None = None,
        job: str | None = None,
        limit: int = 50,
    ) -> list[Saga]:
        cursor = self.sagas.find(state_and_job(state, job)).sort("createdAt", DESCENDING).limit(limit)
        return await self._readable(cursor)

    async def outbox_for(self, saga_id: str) -> list[dict[str, Any]]:
        cursor = self.outbox.find({"saga": ObjectId(saga_id)}).sort("n", ASCENDING)
        return [d async for d in cursor]

    async def list_by_states(
        self, states: list[SagaState], *, oldest_first: bool = False, stalest_first: bool = False, limit: int = 0
    ) -> list[Saga]:
        """Sagas in ``states`` (the supervisor's sweeps): oldest created first, or least recently
        updated first (where orphans are), on request; ``limit`` 0 = all."""
        cursor = self.sagas.find({"state": {"$in": [s.value for s in states]}}).limit(limit)
        if oldest_first:
            cursor = cursor.sort("createdAt", ASCENDING)
        elif stalest_first:
            cursor = cursor.sort("updatedAt", ASCENDING)
        return await self._readable(cursor)

    async def note_restore(self, saga_id: str) -> int:
        """Count a restore; the supervisor parks a saga whose restores keep failing."""
        await resilient(
            lambda: self.sagas.update_one({"_id": oid(saga_id)}, {"$inc": {"restore_attempts": 1}}), "count restore"
        )
        doc = await self.sagas.find_one({"_id": oid(saga_id)}, {"restore_attempts": 1})  # only the supervisor counts
        return int(doc.get("restore_attempts", 0)) if doc else 0

    async def resume(self, saga_id: str, *, abort_reason: str | None = None) -> Saga:
        """Operator action: put a parked saga back where it was (optionally aborting it)."""
        saga = await self.get(saga_id)
        if saga.state != SagaState.PARKED:
            if abort_reason is None:
                raise IllegalTransition(f"saga {saga_id} is {saga.state.value}, not parked; nothing to resume")
            return saga
        back = resumed_state(saga)
        fields: dict[str, Any] = {
            "state": back.value, "parked_reason": None, "parked_from": None, "restore_attempts": 0,
        }
        if abort_reason is not None and back in (SagaState.RUNNING, SagaState.WAITING):
            fields["abort_requested"] = abort_reason  # kept until carried out, even if it parks again
            if back == SagaState.WAITING:
                fields["wake_at"] = _utcnow()  # relaunched now to compensate, not when its wait ends
        await self.sagas.update_one(
            {"_id": oid(saga_id), "state": SagaState.PARKED.value}, {"$set": fields, "$inc": {"lease.epoch": 1}}
        )
        return await self.get(saga_id)

    async def prune(self, older_than: Any, limit: int = 500) -> int:
        """Drop stage payloads of terminal sagas finished before ``older_than``; keep summaries."""
        query = {
            "state": {"$in": [s.value for s in TERMINAL_STATES]},
            "updatedAt": {"$lt": older_than},
            "pruned_at": None,
        }
        ids = [d["_id"] async for d in self.sagas.find(query, {"_id": 1}).limit(limit)]
        if not ids:
            return 0
        now = datetime.now(timezone.utc)
        await self.stages_col.update_many({"saga": {"$in": ids}}, {"$set": {"req": None, "res": None, "pruned": True}})
        await self.signals_col.delete_many({"saga": {"$in": ids}})
        await self.locks.delete_many({"saga": {"$in": ids}})  # released at the end already; never kept
        await self.sagas.update_many({"_id": {"$in": ids}}, {"$set": {"pruned_at": now, "payload": {}}})
        return len(ids)

    async def delete_history(self, older_than: datetime, limit: int = 500) -> int:
        """Delete terminal sagas that ended before ``older_than``, with their stages, signals and locks.

        The store is a system of record for live business transactions, not an archive:
        without this it grows with every saga ever run (export before, if history matters).
        Parked sagas are never deleted; their effects wait for a person."""
        query = {"state": {"$in": [s.value for s in TERMINAL_STATES]}, "updatedAt": {"$lt": older_than}}
        found = [d async for d in self.sagas.find(query, {"_id": 1, "idempotency_key": 1}).limit(limit)]
        if not found:
            return 0
        ids = [d["_id"] for d in found]
        for collection in (self.stages_col, self.signals_col, self.locks):
            await collection.delete_many({"saga": {"$in": ids}})
        deleted = await self.sagas.delete_many({"_id": {"$in": ids}, **query})
        # a deleted saga's key is free again (the saga is gone, its key is not kept either)
        keys = [d["idempotency_key"] for d in found if isinstance(d.get("idempotency_key"), str)]
        if keys:
            await self.keys.delete_many({"_id": {"$in": keys}, "saga": {"$in": ids}})
        return deleted.deleted_count

    async def ended(self, saga_ids: list[str]) -> dict[str, Saga]:
        """Of these sagas, the ones that are terminal or parked (what a waiting caller waits for)."""
        done = [state.value for state in ENDED_STATES]
        cursor = self.sagas.find({"_id": {"$in": [oid(i) for i in saga_ids]}, "state": {"$in": done}})
        return {saga.id: saga for saga in await self._readable(cursor)}

    # -- documents that do not read as sagas -------------------------------------------------
    async def _readable(self, cursor: Any) -> list[Saga]:
        """The sagas of ``cursor``; a document that does not validate is quarantined, not raised.

        One malformed document (written by hand, or by a bug) must not stop the sweep, a
        listing or a waiting caller: it is moved to ``quarantine`` with the reason and logged."""
        sagas: list[Saga] = []
        async for doc in cursor:
            try:
                sagas.append(saga_from_doc(doc))
            except Exception as exc:  # noqa: BLE001 - any way a document fails to read
                await self.quarantine(doc, f"{type(exc).__name__}: {exc}")
        return sagas

    async def quarantine(self, doc: dict[str, Any], reason: str) -> None:
        """Move a saga document that cannot be read out of ``sagas``, keeping it whole for an operator."""
        reason = reason[:2000]
        log.error("saga document %s does not read as a saga; moved to quarantine: %s", doc.get("_id"), reason)

        async def body(session: AsyncClientSession) -> None:
            await self.quarantine_col.replace_one(
                {"_id": doc["_id"]}, {"_id": doc["_id"], "doc": doc, "reason": reason, "at": _utcnow()},
                upsert=True, session=session,
            )  # fmt: skip
            await self.sagas.delete_one({"_id": doc["_id"]}, session=session)

        async def once() -> None:
            async with self.client.start_session() as session:
                await session.with_transaction(body)

        await resilient(once, "quarantine a saga document")

    async def states(self, saga_ids: list[str]) -> dict[str, str]:
        cursor = self.sagas.find({"_id": {"$in": [oid(i) for i in saga_ids]}}, {"state": 1})
        return {str(d["_id"]): d["state"] async for d in cursor}
