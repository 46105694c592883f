"""The mirror (`gateway/mirror/`) on a real mosquitto, fed by a scripted gateway.

The script publishes exactly what a test needs (a gap, garbage, a retained online state) through
the same MQTT connection class the sync uses, and answers `cmd/rebirth` like a gateway. The sync
itself talking to the mirror is `test_sync_e2e.py`.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from mqtt_support import Mosquitto
from tests_support import free_port

from gateway.cli import main
from gateway.mirror.cli import EXIT_TIMEOUT, EXIT_UNREACHABLE
from gateway.mirror.client import Mirror, MqttError
from gateway.mirror.http import create_mirror_app
from gateway.mirror.state import Kind, Notice
from gateway.sync.mqtt import Message, MqttConnection

P = "aiw/v1"
SITE, GW = "plant", "gw1"


def point(value: Any, rev: int) -> dict[str, Any]:
    return {
        "value": value,
        "quality": "GOOD",
        "source_ts": 1.0,
        "gateway_ts": 2.0,
        "rev": rev,
        "reason": None,
        "unit": "m",
        "datatype": "float64",
    }


class ScriptedGateway:
    """Publishes births, diffs and states for one gateway; answers cmd/rebirth with a birth of
    `self.points` at `self.rev` when `answer_rebirths`."""

    def __init__(self, port: int, site: str = SITE, gw: str = GW) -> None:
        self.port, self.site, self.gw = port, site, gw
        self.points: dict[str, dict[str, Any]] = {"a/x": point(0.0, 0)}
        self.rev = 0
        self.session = "s1"
        self.answer_rebirths = True
        self.rebirths_asked = 0
        self.asked = asyncio.Event()
        self.conn: MqttConnection | None = None

    def topic(self, leaf: str) -> str:
        return f"{P}/{self.site}/{self.gw}/{leaf}"

    async def __aenter__(self) -> ScriptedGateway:
        self.conn = MqttConnection(
            host="127.0.0.1",
            port=self.port,
            client_id=f"scripted-{self.site}-{self.gw}",
            keepalive_s=30,
            will=(self.topic("state"), self.state_payload("offline")),
            on_message=self._message,
        )
        await self.conn.open()
        self.conn.subscribe([self.topic("cmd/rebirth")])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.conn is not None
        await self.conn.close()

    def state_payload(self, state: str) -> bytes:
        return json.dumps({"state": state, "session": self.session, "ts": 1.0}).encode()

    def publish(self, leaf: str, body: Any, *, retain: bool = False) -> None:
        assert self.conn is not None
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.conn.publish(self.topic(leaf), raw, retain=retain)

    def birth(self) -> None:
        self.publish(
            "birth",
            {
                "session": self.session,
                "rev": self.rev,
                "ts": 1.0,
                "twin_id": f"{self.site}/{self.gw}",
                "site_id": self.site,
                "gateway_id": self.gw,
                "version": "test",
                "points": self.points,
            },
        )

    def change(self, n: int) -> dict[str, Any]:
        """n changes of a/x (the value is the rev) as one diff body; `self` moves on."""
        events = []
        first = self.rev + 1
        for rev in range(first, first + n):
            events.append(
                {
                    "id": f"cursor_{rev:06d}",
                    "rev": rev,
                    "type": "TelemetryChanged",
                    "ts": 100.0 + rev,
                    "twin_id": f"{self.site}/{self.gw}",
                    "asset_id": "a",
                    "point_id": "a/x",
                    "data": {"value": rev, "quality": "GOOD", "source_ts": 1.0, "reason": None},
                }
            )
            self.points["a/x"] = {**point(rev, rev), "gateway_ts": 100.0 + rev}
        self.rev = first + n - 1
        return {
            "session": self.session,
            "from_rev": first,
            "to_rev": self.rev,
            "historical": False,
            "events": events,
        }

    def _message(self, msg: Message) -> None:
        self.rebirths_asked += 1
        self.asked.set()
        if self.answer_rebirths:
            self.birth()


@pytest.fixture
async def mirror(mosquitto: Mosquitto) -> AsyncIterator[Mirror]:
    m = Mirror("127.0.0.1", mosquitto.port, rebirth_retry_s=2.0, max_payload=1_000_000)
    await m.start(10)
    yield m
    await m.stop()


def born(m: Mirror, site: str = SITE, gw: str = GW, rev: int | None = None) -> bool:
    found = m.state.find(site, gw)
    return (
        found is not None
        and found.state_rev is not None
        and (rev is None or found.covered_rev == rev)
    )


async def test_the_mirror_rebuilds_a_twin_and_serves_it(mosquitto, mirror, aiohttp_client):
    async with ScriptedGateway(mosquitto.port) as gw:
        gw.birth()
        for _ in range(5):
            gw.publish("diff", gw.change(3))
        await mirror.wait_until(lambda: born(mirror, rev=15), 10)
        twin = mirror.twin(SITE, GW)
        assert twin["points"] == gw.points and twin["rev"] == 15
        assert [e["rev"] for e in mirror.history(SITE, GW)] == list(range(1, 16))
        stats = mirror.stats(SITE, GW)
        assert (stats["births"], stats["diffs"], stats["events"], stats["gaps"]) == (1, 5, 15, 0)

        client = await aiohttp_client(create_mirror_app(mirror))
        body = await (await client.get("/gateways")).json()
        assert body["connected"] is True
        assert [(g["site_id"], g["gateway_id"], g["rev"]) for g in body["gateways"]] == [
            (SITE, GW, 15)
        ]
        resp = await client.get(f"/gateways/{SITE}/{GW}/twin")
        assert resp.status == 200 and (await resp.json()) == twin
        resp = await client.get(f"/gateways/{SITE}/{GW}")
        assert (await resp.json())["events"] == 15
        resp = await client.get("/gateways/nowhere/gw9/twin")
        assert resp.status == 404 and "nowhere/gw9" in (await resp.json())["error"]


async def test_a_gap_on_the_wire_asks_the_gateway_for_a_rebirth(mosquitto, mirror):
    notices: list[Notice] = []
    mirror.on_notice = notices.append
    async with ScriptedGateway(mosquitto.port) as gw:
        gw.birth()
        gw.publish("diff", gw.change(2))
        gw.change(2)  # revs 3..4 never published
        gw.publish("diff", gw.change(2))
        await asyncio.wait_for(gw.asked.wait(), 10)
        await mirror.wait_until(
            lambda: born(mirror, rev=6) and not mirror.stats(SITE, GW)["awaiting_birth"], 10
        )
        assert mirror.twin(SITE, GW)["points"] == gw.points
        assert [n.kind for n in notices] == [Kind.BIRTH, Kind.GAP, Kind.REBIRTH, Kind.BIRTH]
        assert notices[1].detail == {"expected": 3, "from_rev": 5, "to_rev": 6}
        stats = mirror.stats(SITE, GW)
        assert (stats["gaps"], stats["rebirths"], stats["births"]) == (1, 1, 2)


async def test_the_drop_hook_loses_a_diff_and_the_rebirth_repairs_it(mosquitto, mirror):
    seen: list[int] = []

    def drop_the_second(site: str, gw: str, payload: bytes) -> bool:
        seen.append(json.loads(payload)["from_rev"])
        return len(seen) == 2

    mirror.drop_diff = drop_the_second
    async with ScriptedGateway(mosquitto.port) as gw:
        gw.birth()
        for _ in range(4):
            gw.publish("diff", gw.change(1))
        await mirror.wait_until(
            lambda: born(mirror, rev=4) and mirror.stats(SITE, GW)["births"] == 2, 10
        )
        assert mirror.dropped == 1 and mirror.stats(SITE, GW)["gaps"] == 1
        assert mirror.twin(SITE, GW)["points"] == gw.points


async def test_a_gateway_already_online_is_asked_for_its_birth(mosquitto):
    async with ScriptedGateway(mosquitto.port) as gw:
        gw.rev = 7
        gw.publish("state", gw.state_payload("online"), retain=True)
        gw.publish("diff", gw.change(1))  # before the mirror: nobody receives it
        m = Mirror("127.0.0.1", mosquitto.port)
        await m.start(10)
        try:
            await m.wait_until(lambda: born(m, rev=8), 10)
            assert m.twin(SITE, GW)["points"] == gw.points
            assert m.stats(SITE, GW)["online"] is True and gw.rebirths_asked == 1
        finally:
            await m.stop()


async def test_an_unanswered_rebirth_is_asked_again(mosquitto, mirror):
    async with ScriptedGateway(mosquitto.port) as gw:
        gw.answer_rebirths = False
        gw.publish("diff", gw.change(1))  # no birth seen yet: ask
        await asyncio.wait_for(gw.asked.wait(), 10)
        gw.asked.clear()
        await asyncio.wait_for(gw.asked.wait(), 15)  # the retry (2 s in the fixture)
        gw.birth()
        await mirror.wait_until(lambda: born(mirror, rev=1), 10)
        assert mirror.stats(SITE, GW)["rebirths"] >= 2


async def test_hostile_messages_are_counted_and_never_stop_the_mirror(mosquitto, mirror):
    async with ScriptedGateway(mosquitto.port) as gw:
        gw.birth()
        gw.publish("birth", b"\xff not json")
        gw.publish("diff", b"[1, 2, 3]")
        gw.publish("diff", {"session": "s1", "from_rev": 1, "to_rev": 0, "events": []})
        gw.publish("state", b'{"state": "sideways"}')
        gw.publish("birth", b"{" + b" " * 1_000_001 + b"}")  # above the fixture's max_payload
        gw.publish("birth", b"[" * 50_000 + b"]" * 50_000)
        assert gw.conn is not None
        gw.conn.publish("elsewhere/v9/plant/gw1/birth", b"{}")
        gw.conn.publish(f"{P}/plant/gw1/cmd/whatever", b"{}")
        gw.publish("diff", gw.change(2))
        await mirror.wait_until(lambda: born(mirror, rev=2), 10)
        assert mirror.twin(SITE, GW)["points"] == gw.points
        assert mirror.stats(SITE, GW)["malformed"] == 6 and mirror.state.malformed == 6


async def test_after_a_broker_restart_the_mirror_asks_for_a_birth_again(mosquitto, mirror):
    async with ScriptedGateway(mosquitto.port) as gw:
        gw.birth()
        gw.publish("diff", gw.change(2))
        await mirror.wait_until(lambda: born(mirror, rev=2), 10)
    await asyncio.to_thread(mosquitto.restart)
    # What the gateway publishes while the mirror is away is lost to a clean session: once
    # back, the mirror asks every gateway it knows for a birth.
    async with ScriptedGateway(mosquitto.port) as gw:
        gw.rev, gw.points = 2, {"a/x": {**point(2, 2), "gateway_ts": 102.0}}
        gw.change(3)
        await mirror.wait_until(lambda: born(mirror, rev=5), 30)
        assert mirror.twin(SITE, GW)["points"] == gw.points
        assert mirror.connects == 2 and mirror.stats(SITE, GW)["births"] == 2


async def test_two_gateways_under_one_broker_are_kept_apart(mosquitto, mirror):
    async with (
        ScriptedGateway(mosquitto.port, "plant", "gw1") as one,
        ScriptedGateway(mosquitto.port, "plant", "gw2") as two,
    ):
        one.birth()
        two.points = {"b/y": point("other", 0)}
        two.birth()
        one.publish("diff", one.change(3))
        await mirror.wait_until(
            lambda: born(mirror, "plant", "gw1", 3) and born(mirror, "plant", "gw2"), 10
        )
        assert mirror.twin("plant", "gw1")["points"] == one.points
        assert mirror.twin("plant", "gw2")["points"] == two.points


async def test_a_broker_with_passwords(tmp_path):
    from mqtt_support import mosquitto_binary

    if mosquitto_binary() is None:
        pytest.skip("mosquitto not installed")
    with Mosquitto(free_port(), tmp_path / "mq", passwords={"cloud": "s3cret"}) as broker:
        wrong = Mirror("127.0.0.1", broker.port, username="cloud", password="nope")
        with pytest.raises(MqttError, match="refused"):
            await wrong.start(0.5)
        m = Mirror("127.0.0.1", broker.port, username="cloud", password="s3cret")
        await m.start(10)
        try:
            assert m.connected
        finally:
            await m.stop()


# -- the command line -----------------------------------------------------------------------------


async def run_cli(*args: str, within_s: float = 60.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "mirror",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), within_s)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_once_prints_the_twin_of_a_gateway_already_online(mosquitto):
    async with ScriptedGateway(mosquitto.port) as gw:
        gw.publish("diff", gw.change(4))
        gw.publish("state", gw.state_payload("online"), retain=True)
        code, out, err = await run_cli(
            "--broker", mosquitto.url, "--once", "--timeout", "20", "--json"
        )
    assert code == 0, err
    (line,) = out.splitlines()
    twin = json.loads(line)
    assert (twin["site_id"], twin["gateway_id"], twin["rev"]) == (SITE, GW, 4)
    assert twin["points"] == gw.points
    # The way there went to stderr, as JSON lines.
    kinds = [json.loads(x)["kind"] for x in err.splitlines() if x.startswith("{")]
    assert kinds[:3] == ["state", "rebirth", "birth"]


async def test_cli_once_times_out_with_exit_3(mosquitto):
    code, out, err = await run_cli(
        "--broker", mosquitto.url, "--site", SITE, "--gateway", GW, "--once", "--timeout", "1"
    )
    assert code == EXIT_TIMEOUT and out == ""
    assert f"no birth from gateway {SITE}/{GW} within 1 s" in err


def test_cli_exits_1_when_the_broker_cannot_be_reached(capsys):
    port = free_port()
    code = main(["mirror", "--broker", f"mqtt://127.0.0.1:{port}", "--once", "--timeout", "1"])
    assert code == EXIT_UNREACHABLE
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}" in err and "refused" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--broker", "http://x:1"], "--broker"),
        (["--broker", "mqtt://x:99999"], "--broker"),
        (["--broker", "mqtt://x", "--site", "a/b"], "--site"),
        (["--broker", "mqtt://x", "--prefix", "aiw/#"], "--prefix"),
        (["--broker", "mqtt://x", "--persistent"], "--client-id"),
        (["--broker", "mqtt://x", "--username", "u"], "--password-file"),
        (["--broker", "mqtt://x", "--ca-file", "ca.pem"], "mqtts://"),
        (["--broker", "mqtts://x", "--ca-file", "/nonexistent/ca.pem"], "TLS files"),
        (["--broker", "mqtt://x", "--serve", "nowhere"], "--serve"),
        (
            ["--broker", "mqtt://x", "--username", "u", "--password-file", "/nonexistent"],
            "/nonexistent",
        ),
    ],
)
def test_cli_usage_errors_exit_2(capsys, args, message):
    assert main(["mirror", *args]) == 2
    assert message in capsys.readouterr().err


async def test_cli_prints_events_and_summaries_serves_http_and_stops_on_sigterm(mosquitto):
    import aiohttp

    http_port = free_port()
    async with ScriptedGateway(mosquitto.port) as gw:
        gw.publish("state", gw.state_payload("online"), retain=True)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.cli",
            "mirror",
            "--broker",
            mosquitto.url,
            "--serve",
            f"127.0.0.1:{http_port}",
            "--summary-s",
            "0.5",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        try:
            lines: list[str] = []

            async def read_until(word: str) -> None:
                try:
                    async with asyncio.timeout(30):
                        while not any(word in line for line in lines):
                            raw = await proc.stdout.readline()  # type: ignore[union-attr]
                            assert raw, f"the mirror ended early: {lines}"
                            lines.append(raw.decode())
                except TimeoutError:
                    pytest.fail(f"no {word!r} from the mirror in 30 s: {lines}")

            await read_until(f"birth     {SITE}/{GW}")  # asked for, the gateway being online
            gw.publish("diff", gw.change(3))
            await read_until("rev 3, 1 diffs, 3 events")
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{http_port}/gateways/{SITE}/{GW}/twin") as resp,
            ):
                assert resp.status == 200
                assert (await resp.json())["points"] == gw.points
        finally:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 30)
    assert proc.returncode == 0
    assert any(f"state     {SITE}/{GW} online (retained)" in line for line in lines), lines
    assert any(f"rebirth   {SITE}/{GW} asked for a rebirth" in line for line in lines), lines
    birth = next(line for line in lines if f"birth     {SITE}/{GW}" in line)
    assert f"{SITE}/{GW} rev 0, 1 points" in birth
    summary = next(line for line in lines if "rev 3, 1 diffs" in line)
    assert "summary" in summary and "0 gaps" in summary
