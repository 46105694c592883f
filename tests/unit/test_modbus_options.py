"""The `max_in_flight` option of a Modbus device: a strict small integer, 1 by default."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from drivers.modbus.options import ModbusOptions


def test_max_in_flight_defaults_to_one_and_takes_1_to_16() -> None:
    assert ModbusOptions().max_in_flight == 1
    assert ModbusOptions(max_in_flight=16).max_in_flight == 16


@pytest.mark.parametrize("value", [0, 17, -1, "4", 4.0, True, None])
def test_max_in_flight_refuses_anything_but_an_int_in_range(value: Any) -> None:
    # A YAML `true` or "4" is a typo, not a depth: strict, like the other counts users type.
    with pytest.raises(ValidationError, match="max_in_flight"):
        ModbusOptions.model_validate({"max_in_flight": value})
