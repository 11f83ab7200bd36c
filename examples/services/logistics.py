"""Logistics service (database ``logistic``): cargo space per route, vehicles, drivers, shipments.

``routes``: ``{_id: route, free}`` – cargo units still free (guarded, never negative).
``vehicles``: ``{_id, capacity, status: available|assigned, shipment}``.
``drivers``: ``{_id, status: available|assigned, shipment}``.
``shipments``: ``{_id, route, volume, status: booked|dispatched|recalled|cancelled, vehicle, driver}``.
"""
from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from typing import Any

from pymongo import UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession

from essential import StepFailed

from .db import collection, ensure_collections, now
from .ledger import apply_once, undo_once

ROUTES = "logistic.routes"
VEHICLES = "logistic.vehicles"
DRIVERS = "logistic.drivers"
SHIPMENTS = "logistic.shipments"
LEDGER = "logistic.operations"


async def reserve_space(key: str, shipment_id: str, route: str, volume: int) -> dict[str, Any]:
    """Book ``volume`` units on ``route`` and open the shipment; a full route is a business failure."""

    async def effect(session: AsyncClientSession) -> dict[str, Any]:
        if await collection(SHIPMENTS).find_one({"_id": shipment_id}, {"_id": 1}, session=session):
            raise StepFailed(f"shipment {shipment_id!r} already exists")
        res = await collection(ROUTES).update_one(
            {"_id": route, "free": {"$gte": volume}}, {"$inc": {"free": -volume}}, session=session
        )
        if res.matched_count == 0:
            raise StepFailed(f"route {route!r} is unknown or has less than {volume} units of cargo space free")
        await collection(SHIPMENTS).insert_one(
            {"_id": shipment_id, "route": route, "volume": volume, "status": "booked", "booked_at": now()},
            session=session,
        )
        return {"shipment": shipment_id, "route": route, "volume": volume}

    return await apply_once(LEDGER, key, "reserve_space", effect)


async def release_space(key: str) -> dict[str, Any]:
    """Compensation of :func:`reserve_space`: free the units, cancel the shipment."""

    async def undo(session: AsyncClientSession, forward: dict[str, Any]) -> dict[str, Any]:
        await collection(ROUTES).update_one(
            {"_id": forward["route"]}, {"$inc": {"free": forward["volume"]}}, session=session
        )
        await collection(SHIPMENTS).update_one(
            {"_id": forward["shipment"]}, {"$set": {"status": "cancelled"}}, session=session
        )
        return {"shipment": forward["shipment"], "route": forward["route"], "volume": forward["volume"]}

    return await undo_once(LEDGER, key, "release_space", undo)


async def _assign(key: str, pool: str, role: str, shipment_id: str, query: dict[str, Any]) -> dict[str, Any]:
    """Take the first available resource of ``pool`` matching ``query`` for the shipment."""

    async def effect(session: AsyncClientSession) -> dict[str, Any]:
        resources = collection(pool)
        # Concurrent sagas that all took "the first available" would write-conflict on
        # one document; each tries a random few of the candidates instead.
        found = await resources.find({**query, "status": "available"}, {"_id": 1}, session=session).limit(64).to_list()
        for candidate in random.sample(found, len(found)):
            taken = await resources.update_one(
                {"_id": candidate["_id"], "status": "available"},
                {"$set": {"status": "assigned", "shipment": shipment_id}},
                session=session,
            )
            if taken.modified_count:
                break
        else:
            raise StepFailed(f"no {role} available for shipment {shipment_id!r}")
        resource = candidate["_id"]
        await collection(SHIPMENTS).update_one({"_id": shipment_id}, {"$set": {role: resource}}, session=session)
        return {"shipment": shipment_id, role: resource, "pool": pool, "role": role}

    return await apply_once(LEDGER, key, f"assign_{role}", effect)


async def _unassign(key: str) -> dict[str, Any]:
    async def undo(session: AsyncClientSession, forward: dict[str, Any]) -> dict[str, Any]:
        role, resource = forward["role"], forward[forward["role"]]
        await collection(forward["pool"]).update_one(
            {"_id": resource, "shipment": forward["shipment"]},
            {"$set": {"status": "available"}, "$unset": {"shipment": ""}},
            session=session,
        )
        await collection(SHIPMENTS).update_one({"_id": forward["shipment"]}, {"$unset": {role: ""}}, session=session)
        return {"shipment": forward["shipment"], role: resource}

    return await undo_once(LEDGER, key, "unassign", undo)


async def assign_vehicle(key: str, shipment_id: str, volume: int) -> dict[str, Any]:
    """A vehicle big enough for ``volume``."""
    return await _assign(key, VEHICLES, "vehicle", shipment_id, {"capacity": {"$gte": volume}})


async def assign_driver(key: str, shipment_id: str) -> dict[str, Any]:
    return await _assign(key, DRIVERS, "driver", shipment_id, {})


async def release_vehicle(key: str) -> dict[str, Any]:
    """Compensation of :func:`assign_vehicle`: the vehicle is available again."""
    return await _unassign(key)


async def release_driver(key: str) -> dict[str, Any]:
    """Compensation of :func:`assign_driver`."""
    return await _unassign(key)


async def dispatch(key: str, shipment_id: str, vehicle: str | None = None, driver: str | None = None) -> dict[str, Any]:
    """The shipment leaves: it needs its vehicle and driver.

    Pass ``vehicle`` and ``driver`` when they were assigned concurrently with the
    booking (a parallel group): the assignment may have run before the shipment
    existed, so dispatch records them on it.
    """

    async def effect(session: AsyncClientSession) -> dict[str, Any]:
        query: dict[str, Any] = {"_id": shipment_id, "status": "booked"}
        update: dict[str, Any] = {"status": "dispatched", "dispatched_at": now()}
        for role, resource in (("vehicle", vehicle), ("driver", driver)):
            if resource is None:
                query[role] = {"$exists": True}
            else:
                update[role] = resource
        res = await collection(SHIPMENTS).update_one(query, {"$set": update}, session=session)
        if res.matched_count == 0:
            raise StepFailed(f"shipment {shipment_id!r} is not booked with a vehicle and a driver")
        return {"shipment": shipment_id, "status": "dispatched"}

    return await apply_once(LEDGER, key, "dispatch", effect)


async def recall(key: str) -> dict[str, Any]:
    """Compensation of :func:`dispatch`: back to booked (the earlier compensations then cancel it)."""

    async def undo(session: AsyncClientSession, forward: dict[str, Any]) -> dict[str, Any]:
        await collection(SHIPMENTS).update_one(
            {"_id": forward["shipment"]}, {"$set": {"status": "booked", "recalled_at": now()}}, session=session
        )
        return {"shipment": forward["shipment"], "status": "recalled"}

    return await undo_once(LEDGER, key, "recall", undo)


async def seed(routes: Mapping[str, int] = {}, vehicles: Mapping[str, int] = {}, drivers: Iterable[str] = ()) -> None:
    """Routes with free cargo units, vehicles with their capacity, drivers; all available."""
    free = {"$unset": {"shipment": ""}}
    for bucket, ops in (
        (ROUTES, [UpdateOne({"_id": r}, {"$set": {"free": int(n)}}, upsert=True) for r, n in routes.items()]),
        (VEHICLES, [UpdateOne({"_id": v}, {"$set": {"capacity": int(c), "status": "available"}, **free}, upsert=True)
                    for v, c in vehicles.items()]),
        (DRIVERS, [UpdateOne({"_id": d}, {"$set": {"status": "available"}, **free}, upsert=True) for d in drivers]),
    ):  # fmt: skip
        if ops:
            await collection(bucket).bulk_write(ops)


async def totals() -> dict[str, int]:
    """Free cargo units and available vehicles/drivers: what a cancelled shipment must give back."""
    rows = await (await collection(ROUTES).aggregate([{"$group": {"_id": None, "n": {"$sum": "$free"}}}])).to_list()
    return {
        "cargo_free": int(rows[0]["n"]) if rows else 0,
        "vehicles_available": await collection(VEHICLES).count_documents({"status": "available"}),
        "drivers_available": await collection(DRIVERS).count_documents({"status": "available"}),
    }


async def ensure_indexes() -> None:
    await ensure_collections(ROUTES, VEHICLES, DRIVERS, SHIPMENTS, LEDGER)
    await collection(VEHICLES).create_index([("status", 1), ("capacity", 1)])
    await collection(DRIVERS).create_index("status")
