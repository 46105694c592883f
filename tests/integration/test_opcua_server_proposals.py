"""SCADA writes as proposals: a real asyncua client writes, the server hands the write to a
stand-in policy engine (`on_propose`), and the client sees the status the engine answered.

The engine here is a recording fake whose answers each test sets: the real engine (its
simulation, its device write) is tested on its own; what is tested here is the path from an OPC
UA Write to `ClientWrite` and back, and how it is bounded. Users come from the site config and
from a real control.db. One server serves most tests (starting one costs a second); the tests
that stop a server to count its refusal records start their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from asyncua import Client, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from tests_support import SCADA_CLIENT_URI, ClientPki, eventually

from gateway.auth.rbac import Grant, Principal, Role
from gateway.control import AccountStore, ControlDB
from gateway.opcua_server import OpcuaServerConfig, TwinOpcuaServer, hash_password
from gateway.opcua_server.proposals import ClientWrite, WriteAnswer
from gateway.opcua_server.refusals import WriteRefusal
from gateway.opcua_server.users import control_db_logins
from gateway.twin.model import PointDef
from gateway.twin.store import TwinStore

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio(loop_scope="module")]

S = ua.StatusCodes
CLIENT_URI = SCADA_CLIENT_URI
PASSWORD = "correct horse"
HASH = hash_password(PASSWORD)
TIMEOUT_S = 1.0  # opcua_server.propose_timeout_s of the shared server: short, for the hang test

HEATER = "line1/oven1/heater_sp"
FAN = "line1/oven1/fan_sp"
VALVE = "utilities/cooling/tank1/inlet_valve"
LEVEL = "utilities/cooling/tank1/level"
POINTS = [
    PointDef(HEATER, "plc", "float64", "°C", 0.0, 300.0, writable=True),
    PointDef(FAN, "plc", "float32", "%", 0.0, 100.0, writable=True),
    PointDef(VALVE, "tank", "float32", "%", 0.0, 100.0, writable=True),
    PointDef(LEVEL, "tank", "float64", "m", 0.0, 5.0),
]
BY_ID = {p.id: p for p in POINTS}

CONFIG_USERS: dict[str, Role] = {
    "op": "supervisor",
    "runner": "executor",
    "bot": "agent",
    "watcher": "viewer",
}
BASE: dict[str, Any] = {
    "enabled": True,
    "endpoint": "opc.tcp://127.0.0.1:0/opstwin",
    "application_uri": "urn:opstwin-tests:gateway",
    "propose_timeout_s": TIMEOUT_S,
    "users": [
        {"username": name, "password_hash": HASH, "role": role}
        for name, role in CONFIG_USERS.items()
    ],
}
READ = {ua.AccessLevel.CurrentRead}
READ_WRITE = {ua.AccessLevel.CurrentRead, ua.AccessLevel.CurrentWrite}


class Engine:
    """A stand-in for the policy engine: records every ClientWrite and answers as told."""

    def __init__(self) -> None:
        self.calls: list[ClientWrite] = []
        self.answer: Callable[[ClientWrite], Any] = lambda w: WriteAnswer("Good", "executed")
        self.gate: asyncio.Event | None = None  # when set, calls wait for it
        self.returned = 0  # calls that ended: answered, raised or cancelled

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]

    async def __call__(self, write: ClientWrite) -> WriteAnswer:
        self.calls.append(write)
        try:
            if self.gate is not None:
                await self.gate.wait()
            result = self.answer(write)
            if isinstance(result, BaseException):
                raise result
            return result
        finally:
            self.returned += 1


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Iterator[TwinStore]:
    twin = TwinStore(tmp_path_factory.mktemp("twin") / "twin.db", POINTS)
    twin.open()
    yield twin
    twin.close()


@pytest.fixture(scope="module")
def accounts(tmp_path_factory) -> Iterator[AccountStore]:
    """control.db: `ana` may propose on line1 only, `gone` is disabled."""
    with ControlDB(tmp_path_factory.mktemp("control") / "control.db") as db:
        made = AccountStore(db)
        made.add_user(
            "ana", PASSWORD, [Grant(role="viewer"), Grant(role="agent", assets=("line1/*",))]
        )
        made.add_user("gone", PASSWORD, [Grant(role="supervisor")])
        made.disable_user("gone")
        yield made


@pytest.fixture(scope="module")
def module_engine() -> Engine:
    return Engine()


@pytest.fixture
def engine(module_engine: Engine) -> Iterator[Engine]:
    """The shared server's engine, answering Good, reset for each test."""
    module_engine.reset()
    yield module_engine
    if module_engine.gate is not None:
        module_engine.gate.set()  # never leave a call of the shared server hanging


@pytest.fixture(scope="module")
def refusals() -> list[WriteRefusal]:
    return []


def trust(pki_dir: Path, pki: ClientPki) -> None:
    trusted = pki_dir / "opcua-server" / "trusted"
    trusted.mkdir(parents=True, exist_ok=True)
    shutil.copy(pki.cert, trusted / "scada.der")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared(
    store, accounts, module_engine, refusals, client_pki, tmp_path_factory
) -> AsyncIterator[TwinOpcuaServer]:
    pki_dir = tmp_path_factory.mktemp("shared-pki")
    trust(pki_dir, client_pki)
    server = TwinOpcuaServer(
        OpcuaServerConfig.model_validate(BASE),
        store,
        BY_ID,
        pki_dir=pki_dir,
        on_write=refusals.append,
        on_propose=module_engine,
        accounts=control_db_logins(accounts),
    )
    async with server:
        yield server


@contextlib.asynccontextmanager
async def scada(
    server: TwinOpcuaServer, pki: ClientPki, user: str = "op", password: str = PASSWORD
) -> AsyncIterator[Client]:
    client = Client(server.endpoint, timeout=10)
    client.application_uri = CLIENT_URI
    await client.set_security(
        SecurityPolicyBasic256Sha256,
        str(pki.cert),
        str(pki.key),
        mode=ua.MessageSecurityMode.SignAndEncrypt,
    )
    client.set_user(user)
    client.set_password(password)
    await client.connect()
    try:
        yield client
    finally:
        await client.disconnect()


def node(client: Client, point_id: str) -> Any:
    return client.get_node(f"ns=2;s={point_id}")


async def write(client: Client, point_id: str, variant: ua.Variant) -> int:
    """Write one value as SCADA does; return the status code the server answered."""
    try:
        await node(client, point_id).write_value(variant)
    except ua.UaStatusCodeError as exc:
        return int(exc.code)
    return S.Good


async def write_many(client: Client, items: list[tuple[str, ua.Variant]]) -> list[int]:
    """One Write request with several points; the status of each, in order."""
    params = ua.WriteParameters()
    for point_id, variant in items:
        params.NodesToWrite.append(
            ua.WriteValue(
                NodeId=ua.NodeId(point_id, 2),
                AttributeId=ua.AttributeIds.Value,
                Value=ua.DataValue(variant),
            )
        )
    return [r.value for r in await client.uaclient.write(params)]


def f32(value: float) -> ua.Variant:
    return ua.Variant(value, ua.VariantType.Float)


def f64(value: float) -> ua.Variant:
    return ua.Variant(value, ua.VariantType.Double)


async def alive(client: Client) -> bool:
    """Whether the session still answers: it reads a point."""
    dv = await node(client, LEVEL).read_data_value(raise_on_bad_status=False)
    return dv.StatusCode is not None


# -- writers, viewers -----------------------------------------------------------------------------


@pytest.mark.parametrize("user", ["op", "runner", "bot"])
async def test_a_writers_write_reaches_the_engine_and_the_client_sees_its_answer(
    shared, engine, client_pki, user
):
    answers = {
        10.0: WriteAnswer("Good", "executed and verified", "p-1"),
        20.0: WriteAnswer("BadOutOfRange", "above the hard limit"),
        30.0: WriteAnswer("BadRequestNotComplete", "waits for approval", "p-2"),
    }
    engine.answer = lambda w: answers[w.value]
    async with scada(shared, client_pki, user=user) as client:
        seen = [await write(client, FAN, f32(value)) for value in answers]
        access = set(await node(client, FAN).get_user_access_level())
    assert seen == [S.Good, S.BadOutOfRange, S.BadRequestNotComplete]
    assert access == READ_WRITE
    role = CONFIG_USERS[user]
    principal = Principal(name=user, kind="user", grants=(Grant(role=role),))
    assert [(w.point_id, w.value, w.user, w.role, w.principal) for w in engine.calls] == [
        (FAN, value, user, role, principal) for value in answers
    ]
    sessions = {w.session for w in engine.calls}
    assert len(sessions) == 1 and sessions.pop().startswith("#")
    assert {w.client for w in engine.calls} == {"127.0.0.1"}


async def test_a_viewer_is_refused_as_before_and_the_engine_never_hears_of_it(
    shared, engine, refusals, client_pki
):
    refusals.clear()
    async with scada(shared, client_pki, user="watcher") as client:
        assert set(await node(client, FAN).get_user_access_level()) == READ
        assert await write(client, FAN, f32(55.0)) == S.BadUserAccessDenied
    async with scada(shared, client_pki) as client:
        assert await write(client, LEVEL, f64(1.0)) == S.BadNotWritable
    assert engine.calls == []
    (refusal,) = refusals
    assert (refusal.user, refusal.role, refusal.point_id, refusal.value, refusal.status) == (
        "watcher",
        "viewer",
        FAN,
        55.0,
        "BadUserAccessDenied",
    )


async def test_points_in_one_request_are_proposed_and_answered_in_order(shared, engine, client_pki):
    statuses = {HEATER: "BadOutOfRange", FAN: "Good", VALVE: "BadRequestNotComplete"}
    engine.answer = lambda w: WriteAnswer(statuses[w.point_id], "as told")
    items = [(HEATER, f64(900.0)), (LEVEL, f64(1.0)), (FAN, f32(5.0)), (VALVE, f32(7.0))]
    async with scada(shared, client_pki) as client:
        seen = await write_many(client, items)
    assert seen == [S.BadOutOfRange, S.BadNotWritable, S.Good, S.BadRequestNotComplete]
    assert [(w.point_id, w.value) for w in engine.calls] == [
        (HEATER, 900.0),
        (FAN, 5.0),
        (VALVE, 7.0),
    ]


# -- an engine that fails -------------------------------------------------------------------------


async def test_an_engine_that_raises_gives_bad_internal_error_and_the_session_lives_on(
    shared, engine, client_pki, caplog
):
    engine.answer = lambda w: RuntimeError("simulation kernel exploded")
    with caplog.at_level(logging.INFO, logger="gateway.opcua_server"):
        async with scada(shared, client_pki) as client:
            seen = [await write(client, FAN, f32(float(i))) for i in range(20)]
            assert await alive(client)
            engine.answer = lambda w: WriteAnswer("Good", "executed")
            assert await write(client, FAN, f32(1.0)) == S.Good
    assert seen == [S.BadInternalError] * 20
    assert len(engine.calls) == 21
    failures = [r for r in caplog.records if "simulation kernel exploded" in r.getMessage()]
    # A traceback, but one per interval, not one per write of a looping client.
    assert len(failures) == 1
    assert "Traceback" in failures[0].getMessage() and "RuntimeError" in failures[0].getMessage()


async def test_an_answer_that_names_no_status_gives_bad_internal_error(
    shared, engine, client_pki, caplog
):
    answers = [
        WriteAnswer("BadNoSuchStatus", "a typo in the engine"),
        WriteAnswer("__class__", "not a status"),
        WriteAnswer("good", "wrong case"),
        "Good",
        None,
        {"status": "Good"},
    ]
    with caplog.at_level(logging.WARNING, logger="gateway.opcua_server"):
        async with scada(shared, client_pki) as client:
            seen = []
            for answer in answers:
                engine.answer = lambda w, answer=answer: answer
                seen.append(await write(client, FAN, f32(1.0)))
            assert await alive(client)
    assert seen == [S.BadInternalError] * len(answers)
    lines = [r.getMessage() for r in caplog.records if "not a WriteAnswer" in r.getMessage()]
    assert len(lines) == 1 and "BadNoSuchStatus" in lines[0]


async def test_a_hanging_engine_gives_bad_timeout_and_keeps_its_place_until_it_returns(
    shared, engine, client_pki, caplog
):
    engine.gate = asyncio.Event()
    with caplog.at_level(logging.INFO, logger="gateway.opcua_server"):
        async with scada(shared, client_pki) as client:
            pending = asyncio.create_task(write(client, HEATER, f64(150.0)))
            await eventually(lambda: engine.calls, what="the engine to be asked")
            # The session's other requests are not held up while the engine decides: the
            # read is answered while the write still waits.
            assert await alive(client)
            assert not pending.done()
            assert await pending == S.BadTimeout
            # The engine has not returned: the session's slot is still taken.
            assert await write(client, HEATER, f64(151.0)) == S.BadTooManyOperations
            assert len(engine.calls) == 1
            engine.gate.set()
            await eventually(lambda: engine.returned == 1, what="the engine to return")
            await eventually(lambda: shared._in_flight.take("#probe") is None)
            shared._in_flight.release("#probe")
            assert await write(client, HEATER, f64(152.0)) == S.Good
    lines = [r.getMessage() for r in caplog.records]
    assert any("propose_timeout_s" in line and "BadTimeout" not in line for line in lines)
    assert any("already answered BadTimeout, was decided: Good" in line for line in lines)


# -- control.db users -----------------------------------------------------------------------------


async def test_a_control_db_user_logs_in_and_its_principal_reaches_the_engine(
    shared, engine, accounts, client_pki
):
    async with scada(shared, client_pki, user="ana") as client:
        # Told what its grants allow: proposing on line1, not on the cooling tank.
        assert set(await node(client, HEATER).get_user_access_level()) == READ_WRITE
        assert set(await node(client, VALVE).get_user_access_level()) == READ
        # Both reach the engine, which checks the scope per point and records the decision.
        engine.answer = lambda w: WriteAnswer(
            "Good" if w.point_id.startswith("line1/") else "BadUserAccessDenied", "scope"
        )
        assert await write(client, HEATER, f64(120.0)) == S.Good
        assert await write(client, VALVE, f32(50.0)) == S.BadUserAccessDenied
        accounts.disable_user("ana")
        try:
            # Disabled while its session is open: the next write carries a disabled Principal.
            await write(client, HEATER, f64(121.0))
        finally:
            accounts.db.write(
                lambda conn: conn.execute("UPDATE users SET disabled = 0 WHERE name = 'ana'")
            )
    principal = Principal(
        name="ana",
        kind="user",
        grants=(Grant(role="viewer"), Grant(role="agent", assets=("line1/*",))),
    )
    assert [(w.user, w.role, w.principal) for w in engine.calls[:2]] == [
        ("ana", "agent", principal),
        ("ana", "agent", principal),
    ]
    last = engine.calls[2].principal
    assert last is not None and last.disabled and last.grants == principal.grants


@pytest.mark.parametrize(("user", "password"), [("ana", "wrong horse"), ("gone", PASSWORD)])
async def test_a_wrong_password_or_a_disabled_control_db_user_cannot_log_in(
    shared, client_pki, user, password
):
    with pytest.raises(ua.UaStatusCodeError) as refused:
        async with scada(shared, client_pki, user=user, password=password):
            pass
    assert refused.value.code == S.BadUserAccessDenied


# -- hostile values -------------------------------------------------------------------------------

HOSTILE = [
    ("nan", f64(math.nan)),
    ("-inf", f64(-math.inf)),
    ("huge string", ua.Variant("x" * 1_000_000, ua.VariantType.String)),
    ("string to a double", ua.Variant("150", ua.VariantType.String)),
    ("int64", ua.Variant(2**63 - 1, ua.VariantType.Int64)),
    ("bool", ua.Variant(True, ua.VariantType.Boolean)),
    ("bytes", ua.Variant(b"\x00\xff" * 100, ua.VariantType.ByteString)),
    ("array", ua.Variant([1.0, 2.0, 3.0], ua.VariantType.Double)),
    ("null", ua.Variant()),
]


async def test_hostile_values_reach_the_engine_unchanged_and_never_crash_the_server(
    shared, engine, client_pki, caplog
):
    engine.answer = lambda w: WriteAnswer("BadTypeMismatch", "not a finite number")
    with caplog.at_level(logging.DEBUG, logger="gateway.opcua_server"):
        async with scada(shared, client_pki) as client:
            seen = await write_many(client, [(HEATER, variant) for _, variant in HOSTILE])
            assert await alive(client)
    assert seen == [S.BadTypeMismatch] * len(HOSTILE)
    got = [w.value for w in engine.calls]
    assert math.isnan(got[0])
    assert got[1:] == [variant.Value for _, variant in HOSTILE[1:]]
    # Logged cut short: a client must not write megabytes into the log.
    assert max(len(r.getMessage()) for r in caplog.records) < 2000


async def test_a_write_of_part_of_a_point_is_refused_before_the_engine(shared, engine, client_pki):
    params = ua.WriteParameters()
    params.NodesToWrite.append(
        ua.WriteValue(
            NodeId=ua.NodeId(HEATER, 2),
            AttributeId=ua.AttributeIds.Value,
            IndexRange="0:1",
            Value=ua.DataValue(ua.Variant([1.0, 2.0], ua.VariantType.Double)),
        )
    )
    async with scada(shared, client_pki) as client:
        (status,) = await client.uaclient.write(params)
    assert status.value == S.BadIndexRangeInvalid
    assert engine.calls == []


# -- floods ---------------------------------------------------------------------------------------


async def test_a_looping_client_gets_too_many_operations_in_few_records(
    store, accounts, client_pki, tmp_path, caplog
):
    engine = Engine()
    engine.gate = asyncio.Event()
    records: list[WriteRefusal] = []
    pki_dir = tmp_path / "pki"
    trust(pki_dir, client_pki)
    config = OpcuaServerConfig.model_validate({**BASE, "max_proposals_in_flight": 2})
    server = TwinOpcuaServer(
        config, store, BY_ID, pki_dir=pki_dir, on_write=records.append, on_propose=engine
    )
    await server.start()
    try:
        with caplog.at_level(logging.INFO, logger="gateway.opcua_server"):
            async with (
                scada(server, client_pki) as looping,
                scada(server, client_pki, user="runner") as second,
                scada(server, client_pki, user="bot") as third,
            ):
                first = asyncio.create_task(write(looping, FAN, f32(1.0)))
                await eventually(lambda: len(engine.calls) == 1, what="the first write")
                flood = await asyncio.gather(*(write(looping, FAN, f32(2.0)) for _ in range(200)))
                assert flood == [S.BadTooManyOperations] * 200
                assert await alive(looping)
                # The server's cap (2 here): a second session gets in, a third does not.
                other = asyncio.create_task(write(second, VALVE, f32(3.0)))
                await eventually(lambda: len(engine.calls) == 2, what="the second session")
                assert await write(third, VALVE, f32(4.0)) == S.BadTooManyOperations
                engine.gate.set()
                assert (await first, await other) == (S.Good, S.Good)
        await server.stop()  # what is still being coalesced is recorded at stop
    finally:
        await server.stop()
    assert len(engine.calls) == 2
    assert server.write_answers == {"Good": 2, "BadTooManyOperations": 201}
    assert {r.status for r in records} == {"BadTooManyOperations"}
    assert sum(r.count for r in records if r.user == "op") == 200
    assert sum(r.count for r in records if r.user == "bot") == 1
    assert len(records) <= 4, records
    lines = [r for r in caplog.records if "BadTooManyOperations" in r.getMessage()]
    assert len(lines) <= 4, [r.getMessage() for r in lines]


async def test_stopping_waits_for_a_decision_then_cancels_it(store, client_pki, tmp_path, caplog):
    engine = Engine()
    engine.gate = asyncio.Event()  # never set: the engine hangs past the stop
    pki_dir = tmp_path / "pki"
    trust(pki_dir, client_pki)
    config = OpcuaServerConfig.model_validate({**BASE, "propose_timeout_s": 0.5})
    server = TwinOpcuaServer(config, store, BY_ID, pki_dir=pki_dir, on_propose=engine)
    await server.start()
    try:
        async with scada(server, client_pki) as client:
            assert await write(client, FAN, f32(1.0)) == S.BadTimeout
    finally:
        with caplog.at_level(logging.WARNING, logger="gateway.opcua_server"):
            await server.stop()
    assert engine.returned == 1  # cancelled, and awaited
    assert any("still being decided" in r.getMessage() for r in caplog.records)
    assert not server._engine_calls and not server._write_tasks
