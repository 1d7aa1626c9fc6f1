"""What the manual and scheduled invokes may say, checked strictly.

A typo such as ``{"dryrun": true}`` must not turn into a real run, so unknown fields and
non-boolean flags are rejected rather than ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from session_gc.errors import BadEvent
from session_gc.sweep import OVERRIDE_BLAST_RADIUS


@dataclass(frozen=True)
class FullGcRequest:
    dry_run: bool = False
    force: bool = False


@dataclass(frozen=True)
class SweepRequest:
    dry_run: bool = False
    override: str | None = None


def parse_full_gc_event(event: Any) -> FullGcRequest:
    """``{"dryRun": bool, "force": bool}``; an empty or null event is a real run."""
    fields = _fields(event, allowed={"dryRun", "force"}, what="full GC event")
    return FullGcRequest(
        dry_run=_flag(fields, "dryRun", "full GC event"),
        force=_flag(fields, "force", "full GC event"),
    )


def parse_sweep_event(event: Any) -> SweepRequest:
    """The EventBridge scheduled event, or a manual ``{"dryRun": bool, "override": ...}``.

    The scheduled event's own fields are not needed, but ``dryRun``/``override`` are read
    even there: an operator who copies the sample event and adds ``"dryRun": true`` must get
    a dry run, never a real one.
    """
    if isinstance(event, Mapping) and event.get("detail-type") == "Scheduled Event":
        event = {k: v for k, v in event.items() if k in ("dryRun", "override")}
    fields = _fields(event, allowed={"dryRun", "override"}, what="sweep event")
    override = fields.get("override")
    if override is not None and override != OVERRIDE_BLAST_RADIUS:
        raise BadEvent(
            f'sweep event: "override" may only be "{OVERRIDE_BLAST_RADIUS}", got {override!r}'
        )
    return SweepRequest(dry_run=_flag(fields, "dryRun", "sweep event"), override=override)


def _fields(event: Any, *, allowed: set[str], what: str) -> Mapping[str, Any]:
    if event is None:
        return {}
    if not isinstance(event, Mapping):
        raise BadEvent(f"{what} must be a JSON object, got {type(event).__name__}")
    unknown = sorted(set(event) - allowed)
    if unknown:
        raise BadEvent(f"{what} has unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    return event


def _flag(fields: Mapping[str, Any], name: str, what: str) -> bool:
    value = fields.get(name, False)
    if not isinstance(value, bool):
        raise BadEvent(f'{what}: "{name}" must be true or false, got {value!r}')
    return value
