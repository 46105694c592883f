"""The AIW JSON Schemas: valid 2020-12 documents, and true to the models and the data they name.

Each document is checked against the 2020-12 meta-schema, and against real data: the repo's
policy files, a `ProposalRecord`'s JSON, an action, an anomaly event, an event as it leaves the
gateway. For the ingest request, the document and the model agree on hostile bodies, and a
property test holds that the document never refuses what the model accepts (a client that
validates against the published schema is never stricter than the gateway).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from drivers.contract import Quality
from gateway.aiw.events import dumps, event_json
from gateway.aiw.schemas import (
    MAX_INGEST_ITEMS,
    SCHEMA_BASE,
    SCHEMAS,
    ActionV1,
    ProposalV1,
    SimRunRequest,
    TelemetryIngest,
    schema_document,
    schema_names,
)
from gateway.policy.anomaly import Anomaly
from gateway.policy.engine import ProposalRecord
from gateway.policy.gate import Confidence, Decision, HardLimits, Proposal, Proposer
from gateway.policy.model import Policy
from gateway.twin.model import EventRecord

ROOT = Path(__file__).resolve().parents[2]
NAMES = ["telemetry.v1", "anomaly.v1", "policy.v1", "proposal.v1", "action.v1", "sim.v1",
         "twin.v1", "event.v1"]  # fmt: skip


def validator(name: str) -> Any:
    return jsonschema_rs.validator_for(schema_document(name))


def test_the_registry_holds_every_schema_the_design_names():
    assert schema_names() == NAMES == list(SCHEMAS)


@pytest.mark.parametrize("name", NAMES)
def test_every_schema_is_a_2020_12_document_with_its_own_id(name: str):
    document = schema_document(name)
    assert document["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert document["$id"] == SCHEMA_BASE + name
    jsonschema_rs.meta.validate(document)
    json.dumps(document, allow_nan=False)  # plain JSON, servable as it is
    assert document["description"], "every schema says what it is"


def test_an_unknown_schema_is_a_key_error():
    with pytest.raises(KeyError):
        schema_document("nonsense.v9")


def test_sim_v1_documents_the_request_and_its_result():
    document = schema_document("sim.v1")
    assert {"point", "value", "horizon_s", "paths"} <= set(document["properties"])
    assert "SimRunResult" in document["$defs"]


# -- real data against the documents -------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((ROOT / "policies").glob("*.yaml")), ids=lambda p: p.name)
def test_the_repos_policies_are_valid_policy_v1(path: Path):
    data = yaml.safe_load(path.read_text())
    validator("policy.v1").validate(data)
    Policy.model_validate(data)  # and the model the gateway loads them with agrees


def test_policy_v1_refuses_what_the_policy_model_refuses():
    data = yaml.safe_load((ROOT / "policies" / "oven-overtemp-drift.yaml").read_text())
    for broken in ({**data, "surprise": 1}, {k: v for k, v in data.items() if k != "action"}):
        assert not validator("policy.v1").is_valid(broken)
        with pytest.raises(ValidationError):
            Policy.model_validate(broken)


def record(status: str = "succeeded", previous: Any = 180.0) -> ProposalRecord:
    limits = HardLimits("line1/oven1/heater_setpoint", True, 150.0, 200.0)
    proposal = Proposal(
        id="p-1a2b3c-7",
        point="line1/oven1/heater_setpoint",
        value=178.0,
        proposer=Proposer("agent1", "token"),
        policy=None,
        reason="cool down",
        idempotency_key="k-1",
        created_ts=1_700_000_000.0,
        current_value=180.0,
        current_quality=Quality.GOOD,
        current_age_s=0.5,
    )
    decision = Decision(
        proposal.id,
        "auto_execute",
        ("confidence 0.93 >= 0.9",),
        Confidence(0.93, {"p": 0.95, "q": 1.0}),
        limits,
        ("permission", "limits"),
    )
    return ProposalRecord(
        proposal,
        limits,
        None,
        "http",
        status=status,  # type: ignore[arg-type]
        decision=decision,
        previous_value=previous,
        read_back=178.0,
        finished_ts=1_700_000_001.0,
        timings_ms={"t0": 1.0, "total": 12.5},
    )


def test_a_proposal_record_is_a_valid_proposal_v1():
    data = json.loads(json.dumps(record().to_json()))
    validator("proposal.v1").validate(data)
    ProposalV1.model_validate(data)


@pytest.mark.parametrize(
    ("status", "previous", "shown"),
    [("succeeded", 180.0, 180.0), ("rolled_back", 180.0, 180.0), ("failed", math.nan, None)],
)
def test_an_action_is_built_from_its_record_and_is_a_valid_action_v1(status, previous, shown):
    action = ActionV1.from_record(record(status, previous))
    data = json.loads(json.dumps(action.model_dump(mode="json"), allow_nan=False))
    validator("action.v1").validate(data)
    assert data["previous_value"] == shown, "JSON has no NaN"
    assert data["rolled_back"] is (status == "rolled_back")
    assert data["verified"] is (status != "failed")
    assert data["executed_ts"] == 1_700_000_001.0 and data["value"] == 178.0


def test_a_proposal_that_wrote_nothing_is_no_action():
    with pytest.raises(ValidationError):
        ActionV1.from_record(record("pending_approval"))


def test_an_anomaly_events_data_is_a_valid_anomaly_v1():
    anomaly = Anomaly(
        "line1/oven1/temperature", "zscore", 0.71, 1_700_000_000.0, {"z": math.inf, "sd": None}
    )
    validator("anomaly.v1").validate(json.loads(json.dumps(anomaly.event_data())))


def test_an_event_as_it_leaves_the_gateway_is_a_valid_event_v1():
    event = EventRecord(
        rev=123,
        ts=1_700_000_000.0,
        type="TelemetryChanged",
        asset_id="line1/oven1",
        point_id="line1/oven1/temperature",
        data={"value": math.nan, "quality": "BAD", "nested": [1.0, math.inf]},
    )
    data = json.loads(dumps(event_json(event, "site/gw")))
    validator("event.v1").validate(data)
    assert data["id"] == "cursor_000123" and data["data"]["value"] is None


# -- telemetry.v1: the model and the document agree -----------------------------------------------

GOOD_ITEM = {"point": "line1/lab/sample_temp", "value": 12.5}


@pytest.mark.parametrize(
    "body",
    [
        {"items": [GOOD_ITEM]},
        {"items": [{**GOOD_ITEM, "value": 3}]},
        {"items": [{**GOOD_ITEM, "value": True}]},
        {"items": [{**GOOD_ITEM, "value": "batch 7"}]},
        {"items": [{**GOOD_ITEM, "quality": "UNCERTAIN", "source_ts": 1_700_000_000.5}]},
        {"items": [{**GOOD_ITEM, "source_ts": None}]},
        {"items": [GOOD_ITEM] * MAX_INGEST_ITEMS},
    ],
)
def test_ingest_bodies_both_accept(body: dict[str, Any]):
    TelemetryIngest.model_validate_json(json.dumps(body))
    validator("telemetry.v1").validate(body)


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({}, "items"),
        ({"items": []}, "items"),
        ({"items": [GOOD_ITEM] * (MAX_INGEST_ITEMS + 1)}, "items"),
        ({"items": [GOOD_ITEM], "more": 1}, "more"),
        ({"items": GOOD_ITEM}, "items"),
        ({"items": [{"value": 1.0}]}, "point"),
        ({"items": [{**GOOD_ITEM, "point": "NoSlash"}]}, "point"),
        ({"items": [{**GOOD_ITEM, "point": "Line1/UPPER"}]}, "point"),
        ({"items": [{**GOOD_ITEM, "point": "a/" + "b" * 300}]}, "point"),
        ({"items": [{"point": GOOD_ITEM["point"]}]}, "value"),
        ({"items": [{**GOOD_ITEM, "value": None}]}, "value"),
        ({"items": [{**GOOD_ITEM, "value": [1.0]}]}, "value"),
        ({"items": [{**GOOD_ITEM, "value": {"v": 1}}]}, "value"),
        ({"items": [{**GOOD_ITEM, "value": "x" * 5000}]}, "value"),
        ({"items": [{**GOOD_ITEM, "quality": "STALE"}]}, "quality"),
        ({"items": [{**GOOD_ITEM, "quality": "good"}]}, "quality"),
        ({"items": [{**GOOD_ITEM, "source_ts": "1700000000"}]}, "source_ts"),
        ({"items": [{**GOOD_ITEM, "source_ts": -1}]}, "source_ts"),
        ({"items": [{**GOOD_ITEM, "unit": "°C"}]}, "unit"),
    ],
)
def test_hostile_ingest_bodies_are_refused_by_both_naming_the_field(
    body: dict[str, Any], where: str
):
    with pytest.raises(ValidationError) as refused:
        TelemetryIngest.model_validate_json(json.dumps(body))
    assert where in {str(part) for error in refused.value.errors() for part in error["loc"]}
    assert not validator("telemetry.v1").is_valid(body)


@pytest.mark.parametrize(
    "text",
    [
        '{"items": [{"point": "a/b", "value": 1e400}]}',
        '{"items": [{"point": "a/b", "value": NaN}]}',
        '{"items": [{"point": "a/b", "value": 1, "source_ts": 1e999}]}',
    ],
)
def test_numbers_beyond_json_are_refused(text: str):
    with pytest.raises(ValidationError):
        TelemetryIngest.model_validate_json(text)


def test_an_integer_keeps_every_digit_and_one_beyond_64_bits_is_refused():
    item = TelemetryIngest.model_validate_json(
        '{"items": [{"point": "a/b", "value": 9007199254740993}]}'
    ).items[0]
    assert item.value == 9007199254740993 and isinstance(item.value, int)
    with pytest.raises(ValidationError, match="64 bits"):
        TelemetryIngest.model_validate_json(f'{{"items": [{{"point": "a/b", "value": {2**64}}}]}}')


_JSON = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=6,
)
_ITEM = st.fixed_dictionaries(
    {"point": st.sampled_from(["a/b", "line1/oven1/t", "A/b", "ab", ""]) | st.text(max_size=6)},
    optional={
        "value": _JSON | st.integers(-(2**63), 2**64 - 1),
        "quality": st.sampled_from(["GOOD", "UNCERTAIN", "BAD", "STALE", "x"]) | _JSON,
        "source_ts": st.none() | st.floats(allow_nan=False, allow_infinity=False) | _JSON,
        "extra": _JSON,
    },
)


@settings(max_examples=300, deadline=None)
@given(items=st.lists(_ITEM, max_size=4))
def test_the_document_never_refuses_what_the_model_takes(items: list[dict[str, Any]]):
    body = {"items": items}
    try:
        TelemetryIngest.model_validate_json(json.dumps(body))
    except ValidationError:
        return
    assert validator("telemetry.v1").is_valid(body), body


# -- sim.v1 --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        {"paths": 0},
        {"paths": 100_001},
        {"paths": 10.5},
        {"paths": True},
        {"horizon_s": 0},
        {"horizon_s": -5},
        {"horizon_s": 8 * 24 * 3600.0},
        {"horizon_s": "60"},
        {"seed": 1},
    ],
)
def test_hostile_simulation_requests_are_refused_by_both(extra: dict[str, Any]):
    body = {"point": "line1/oven1/heater_setpoint", "value": 178.0, **extra}
    with pytest.raises(ValidationError):
        SimRunRequest.model_validate_json(json.dumps(body))
    assert not validator("sim.v1").is_valid(body)


def test_a_simulation_request_with_defaults_is_valid_for_both():
    body = {"point": "line1/oven1/heater_setpoint", "value": 178}
    assert SimRunRequest.model_validate_json(json.dumps(body)).paths is None
    validator("sim.v1").validate(body)


def test_a_whole_float_is_a_count_for_both():
    # JSON Schema's integer is any number without a fraction: 2000.0 is one.
    body = {"point": "line1/oven1/heater_setpoint", "value": 178, "paths": 2000.0}
    assert SimRunRequest.model_validate_json(json.dumps(body)).paths == 2000
    validator("sim.v1").validate(body)
