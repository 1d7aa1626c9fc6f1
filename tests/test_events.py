"""Invoke events are parsed strictly: a typo must never turn into a real run."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import EVENTS

from session_gc.errors import BadEvent
from session_gc.events import (
    FullGcRequest,
    SweepRequest,
    parse_full_gc_event,
    parse_sweep_event,
)
from session_gc.sweep import OVERRIDE_BLAST_RADIUS


def load_event(name: str) -> Any:
    return json.loads((EVENTS / name).read_text())


@pytest.mark.parametrize("event", [{}, None])
def test_full_gc_empty_event_is_a_real_run_that_spares_live_sessions(event: Any) -> None:
    assert parse_full_gc_event(event) == FullGcRequest(dry_run=False, force=False)


def test_full_gc_dry_run_flag_is_read() -> None:
    assert parse_full_gc_event({"dryRun": True}) == FullGcRequest(dry_run=True, force=False)


def test_full_gc_force_flag_is_read() -> None:
    assert parse_full_gc_event({"force": True}) == FullGcRequest(dry_run=False, force=True)


def test_full_gc_sample_event_parses_as_a_dry_run() -> None:
    assert parse_full_gc_event(load_event("full_gc.json")) == FullGcRequest(dry_run=True)


@pytest.mark.parametrize(
    ("event", "named"),
    [
        ({"dryrun": True}, "dryrun"),
        ({"dry_run": True}, "dry_run"),
        ({"dryRun": True, "Force": True}, "Force"),
        ({"dryRun": "yes"}, "dryRun"),
        ({"dryRun": 1}, "dryRun"),
        ({"force": "true"}, "force"),
        ({"force": None}, "force"),
        (["dryRun"], "list"),
        ("dryRun", "str"),
    ],
)
def test_full_gc_malformed_event_is_rejected_naming_the_problem(event: Any, named: str) -> None:
    with pytest.raises(BadEvent) as caught:
        parse_full_gc_event(event)

    assert named in str(caught.value)


def test_sweep_scheduled_event_from_eventbridge_gives_defaults() -> None:
    assert parse_sweep_event(load_event("sweep.json")) == SweepRequest()


def test_sweep_empty_event_gives_defaults() -> None:
    assert parse_sweep_event({}) == SweepRequest(dry_run=False, override=None)


def test_sweep_manual_event_reads_dry_run_and_blast_radius_override() -> None:
    request = parse_sweep_event({"dryRun": True, "override": "blast-radius"})

    assert request == SweepRequest(dry_run=True, override=OVERRIDE_BLAST_RADIUS)


@pytest.mark.parametrize(
    ("event", "named"),
    [
        ({"override": "everything"}, "everything"),
        ({"override": True}, "override"),
        ({"dryrun": True}, "dryrun"),
        ({"force": True}, "force"),
        ({"dryRun": "false"}, "dryRun"),
        ([{"dryRun": True}], "list"),
    ],
)
def test_sweep_malformed_event_is_rejected_naming_the_problem(event: Any, named: str) -> None:
    with pytest.raises(BadEvent) as caught:
        parse_sweep_event(event)

    assert named in str(caught.value)


def test_sweep_event_that_only_looks_scheduled_is_still_checked() -> None:
    event = {**load_event("sweep.json"), "detail-type": "Manual Event"}

    with pytest.raises(BadEvent, match="unknown field"):
        parse_sweep_event(event)
