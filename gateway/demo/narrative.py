"""What `opstwin demo` prints about the policy engine's proposals, as they are decided and end.

The engine logs one line per step; a new user also wants to see *why*: what the simulation
found, how the confidence was made, what the device read back. The text is made from
`ProposalRecord.to_json()` by pure functions; `Narrator` polls the engine and prints each
proposal twice at most: once decided, once finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["Narrator", "decided_lines", "finished_lines"]

FINISHED = ("succeeded", "failed", "rejected", "expired", "rolled_back")
POLL_S = 0.25  # a decision takes ~0.1 s; a quarter second keeps the story close behind it


def decided_lines(p: Mapping[str, Any], unit: str = "") -> list[str]:
    """The proposal, its simulation and the gate's decision, one line each (and a wait)."""
    u = f" {unit}" if unit else ""
    proposer = p["proposer"]
    who = f"{proposer['kind']} `{proposer['name']}`"
    now = _num(p.get("current_value"))
    reason = str(p.get("reason") or "")
    if p.get("policy") and reason.startswith(f"policy {p['policy']}: "):
        reason = reason[len(f"policy {p['policy']}: ") :]
    lines = [f"proposal {p['id']}: {who} proposes {p['point']} {now} -> {_num(p['value'])}{u}"]
    lines[0] += f": {reason}" if reason else ""
    lines.append("  " + simulation_text(p))
    lines.append("  " + decision_text(p))
    if p["status"] in ("pending_approval", "pending_analysis") and p.get("expires_ts"):
        until = dt.datetime.fromtimestamp(p["expires_ts"]).strftime("%H:%M:%S")
        who_decides = "a supervisor's approval" if p["status"] == "pending_approval" else "analysis"
        lines.append(f"  waiting for {who_decides} until {until} (then it expires, rejected)")
    return lines


def simulation_text(p: Mapping[str, Any]) -> str:
    """What the proposal's simulation found."""
    sim = p.get("simulation")
    if not sim:
        if p.get("decision") == "reject":
            return "simulation: not run (the cheap checks rejected it first)"
        return "simulation: none (no policy models this point)"
    if sim.get("error"):
        return f"simulation failed: {sim['error']}"
    paths = int(sim.get("paths") or 0)
    safe = sim.get("paths_safe")
    improved = sim.get("paths_improved")
    ms = (p.get("timings_ms") or {}).get("simulation")
    minutes = float(sim.get("horizon_s") or 0) / 60
    text = (
        f"simulation ({sim.get('model')}, {paths:,} paths x {sim.get('steps')} steps, "
        f"{minutes:g} min ahead): "
    )
    text += f"{safe:,} keep every safety limit" if safe is not None else "safety not counted"
    if improved is not None:
        text += f", {improved:,} improve the objective"
    breakdown = p.get("confidence_breakdown") or {}
    if "p_sim" in breakdown:
        text += f"; p = {breakdown['p_sim']:.3f}"
    if ms is not None:
        text += f" ({ms:.0f} ms)"
    return text


def decision_text(p: Mapping[str, Any]) -> str:
    """The gate's decision with its confidence factors and reasons."""
    reasons = "; ".join(p.get("reasons") or [])
    conf = p.get("confidence")
    b = p.get("confidence_breakdown") or {}
    if conf is None:
        return f"decision: {p.get('decision')}: {reasons}"
    factors = " x ".join(
        f"{name} {b[key]:.2f}"
        for name, key in (
            ("p", "p_sim"),
            ("quality", "quality_factor"),
            ("record", "record_factor"),
            ("agreement", "agreement_factor"),
        )
        if key in b
    )
    return f"decision: {p.get('decision')} at confidence {conf:.3f} ({factors}): {reasons}"


def finished_lines(p: Mapping[str, Any], unit: str = "") -> list[str]:
    """How the proposal ended: the value the device read back, or why nothing was written."""
    u = f" {unit}" if unit else ""
    status = p["status"]
    timings = p.get("timings_ms") or {}
    if status == "succeeded":
        by = f"approved by `{p['approver']}`; " if p.get("approver") else ""
        line = (
            f"proposal {p['id']}: {by}written: the device read back {_num(p['read_back'])}{u} "
            f"(was {_num(p.get('previous_value'))}{u})"
        )
        if "write" in timings:
            line += f"; write and read-back {timings['write']:.0f} ms"
        if "total" in timings and not p.get("approver"):
            line += f", {timings['total']:.0f} ms from the proposal"
        return [line]
    if status == "failed":
        restored = f"; {p['restored']}" if p.get("restored") else ""
        return [f"proposal {p['id']}: write failed: {p.get('error')}{restored}"]
    if status == "rolled_back":
        return [f"proposal {p['id']}: rolled back to {_num(p.get('previous_value'))}{u}"]
    why = p.get("error") or "; ".join(p.get("reasons") or [])
    return [f"proposal {p['id']}: {status}, nothing written: {why}"]


class Narrator:
    """Prints each proposal of an engine once decided and once finished (the demo only)."""

    def __init__(
        self, engine: Any, units: Mapping[str, str], out: Callable[[str], None] | None = None
    ) -> None:
        self.engine = engine
        self.units = units
        self.out = out or _print
        self._told: dict[str, str] = {}  # proposal id -> "decided" or "finished"

    def poll(self) -> None:
        """Print what happened to the engine's proposals since the last poll."""
        for record in reversed(self.engine.recent(limit=50)):
            told = self._told.get(record.id)
            if told == "finished" or record.decision is None:
                continue
            p = record.to_json()
            unit = self.units.get(p["point"], "")
            if told is None:
                self._say(decided_lines(p, unit))
                self._told[record.id] = "decided"
            if p["status"] in FINISHED and (p["status"] != "rejected" or p.get("error")):
                self._say(finished_lines(p, unit))
                self._told[record.id] = "finished"
            elif p["status"] == "rejected":  # the decision line already said why
                self._told[record.id] = "finished"

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until `stop` is set, and once more then; a failure ends the story, not the demo."""
        try:
            while not stop.is_set():
                self.poll()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), POLL_S)
            self.poll()
        except Exception as exc:  # the demo goes on without its narrator; say why
            self.out(f"  (the proposal narrative stopped: {type(exc).__name__}: {exc})")

    def _say(self, lines: list[str]) -> None:
        for line in lines:
            self.out(f"  {line}")


def _print(line: str) -> None:
    print(line, flush=True)


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return "?" if value is None else str(value)
