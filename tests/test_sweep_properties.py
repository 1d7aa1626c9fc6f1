"""Property: whatever the keyspace and however heartbeats come and go between (and during)
sweeps, the sweep deletes exactly what the two-phase rule says, on a real Valkey.

A small model follows the rule (candidates stamped when first seen dead, collected a grace
period later if still dead, dropped when live or gone, guards) and every sweep is checked
against it, plus the safety invariants spelled out on their own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import redis
from conftest import PREFIX, keys_of
from hypothesis import HealthCheck, event, given
from hypothesis import strategies as st

from session_gc.ids import KeySpace
from session_gc.observability import metrics
from session_gc.runtime import Runtime
from session_gc.settings import Settings
from session_gc.sweep import sweep

CANDIDATES = f"{PREFIX}:gc:candidates"
RATIO = 0.5
TYPES = ("string", "hash", "list", "set", "zset", "stream")
KEYSPACE = KeySpace(PREFIX)
BYSTANDERS = {
    f"{PREFIX}:channel:slack-1:cursor": "keep",
    f"{PREFIX}:channel:a:state": "keep",  # named like a session id
    "other:session:a:meta": "keep",
    f"{PREFIX}:sessions:a:meta": "keep",
    f"{PREFIX}:session:a": "keep",  # no part after the id: not a session key
    f"{PREFIX}:gc:unrelated": "keep",
}


def root(sid: str, tagged: bool) -> str:
    return f"{PREFIX}:session:{{{sid}}}:" if tagged else f"{PREFIX}:session:{sid}:"


@dataclass
class SessionSpec:
    sid: str
    parts: list[tuple[str, bool]]  # (type, hash-tagged) of each data key
    heartbeat: bool
    heartbeat_tagged: bool

    def data_keys(self) -> dict[str, str]:
        return {
            f"{root(self.sid, t)}part{i}-{kind}": kind for i, (kind, t) in enumerate(self.parts)
        }

    @property
    def heartbeat_key(self) -> str:
        return root(self.sid, self.heartbeat_tagged) + "heartbeat"


@st.composite
def session_specs(draw: st.DrawFn, sid: str) -> SessionSpec:
    parts = draw(st.lists(st.tuples(st.sampled_from(TYPES), st.booleans()), min_size=1, max_size=4))
    return SessionSpec(sid, parts, draw(st.booleans()), draw(st.booleans()))


@st.composite
def keyspaces(draw: st.DrawFn) -> list[SessionSpec]:
    # A tiny alphabet makes ids that are prefixes of one another ("a", "ab", "a-b") common.
    ids = draw(
        st.lists(st.text("ab-1", min_size=1, max_size=3), min_size=1, max_size=7, unique=True)
    )
    return [draw(session_specs(sid)) for sid in ids]


def steps(count: int) -> st.SearchStrategy[list[tuple[str, int]]]:
    target = st.integers(0, count - 1)
    racing = st.tuples(st.just("sweep-racing-heartbeat"), target)
    step = st.one_of(
        st.tuples(st.just("sweep"), st.just(0)),
        st.tuples(st.just("sweep-override"), st.just(0)),
        racing,
        racing,  # listed twice: a race needs a due session, which is rarer
        st.tuples(st.just("advance"), st.integers(0, 150)),
        st.tuples(st.just("heartbeat-on"), target),
        st.tuples(st.just("heartbeat-off"), target),
        st.tuples(st.just("delete"), target),
        st.tuples(st.just("rewrite"), target),
    )
    return st.lists(step, min_size=1, max_size=20)


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    sessions = draw(keyspaces())
    return {
        "sessions": sessions,
        # Sessions whose heartbeat never stops: with none, the guards fire often.
        "anchors": draw(st.sampled_from([0, 0, 1, 2, 4])),
        "grace": draw(st.sampled_from([0, 1, 60, 100, 300])),
        "steps": draw(steps(len(sessions))),
    }


def write_key(pipe: Any, key: str, kind: str) -> None:
    if kind == "string":
        pipe.set(key, "v")
    elif kind == "hash":
        pipe.hset(key, "f", "v")
    elif kind == "list":
        pipe.rpush(key, "v")
    elif kind == "set":
        pipe.sadd(key, "v")
    elif kind == "zset":
        pipe.zadd(key, {"v": 1})
    else:
        pipe.xadd(key, {"f": "v"})


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Model:
    """What the keyspace and the candidates hash must hold, by the two-phase rule."""

    grace: float
    data: dict[str, set[str]] = field(default_factory=dict)  # sid -> data keys present
    heartbeat: dict[str, str | None] = field(default_factory=dict)  # sid -> heartbeat key
    candidates: dict[str, float] = field(default_factory=dict)
    # Whether a heartbeat existed at some moment since a sweep last looked at the session.
    blinked: dict[str, bool] = field(default_factory=dict)

    def keys(self) -> set[str]:
        out = set(BYSTANDERS)
        for sid, keys in self.data.items():
            out |= keys
            if self.heartbeat[sid]:
                out.add(self.heartbeat[sid] or "")
        if self.candidates:
            out.add(CANDIDATES)
        return out

    def sweep(self, now: float, *, override: bool, racer: str | None) -> tuple[bool, set[str]]:
        """Apply one sweep; returns (stopped by a guard, sessions collected)."""
        seen = {sid for sid in self.data if self.data[sid] or self.heartbeat[sid]}
        live = {sid for sid in seen if self.heartbeat[sid]}
        dead = seen - live
        due = {s for s in dead if s in self.candidates and now - self.candidates[s] >= self.grace}
        gone = self.candidates.keys() - seen
        for sid in (live & self.candidates.keys()) | gone:
            del self.candidates[sid]
        for sid in dead - self.candidates.keys():
            self.candidates[sid] = now
        for sid in seen:
            self.blinked[sid] = bool(self.heartbeat[sid])
        stopped = not override and (
            (bool(seen) and not live) or (bool(due) and len(due) > RATIO * len(seen))
        )
        collected: set[str] = set()
        if not stopped and due:
            collected = due - {racer}
            for sid in due:
                del self.candidates[sid]
            for sid in collected:
                self.data[sid] = set()
        return stopped, collected


@given(scenario=scenarios())
@hypothesis.example(
    # a due session whose heartbeat appears between the up-front check and the deletion
    scenario={
        "sessions": [SessionSpec("a", [("hash", True)], False, False)],
        "anchors": 2,
        "grace": 60,
        "steps": [],
    }
)
@hypothesis.settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_sweep_deletes_exactly_what_the_two_phase_rule_allows(
    valkey: redis.Redis, settings: Settings, scenario: dict[str, Any]
) -> None:
    valkey.flushdb()
    metrics.clear_metrics()
    specs: list[SessionSpec] = scenario["sessions"]
    anchors = [
        SessionSpec(f"anchor{i}", [("hash", False)], True, i % 2 == 0)
        for i in range(scenario["anchors"])
    ]
    model = Model(grace=scenario["grace"])
    pipe = valkey.pipeline(transaction=False)
    for spec in specs + anchors:
        model.data[spec.sid] = set(spec.data_keys())
        model.heartbeat[spec.sid] = spec.heartbeat_key if spec.heartbeat else None
        model.blinked[spec.sid] = spec.heartbeat
        for key, kind in spec.data_keys().items():
            write_key(pipe, key, kind)
        if spec.heartbeat:
            pipe.set(spec.heartbeat_key, "1")
    for key, value in BYSTANDERS.items():
        pipe.set(key, value)
    pipe.execute()

    clock = Clock()
    rt = Runtime(dataclasses.replace(settings, sweep_grace_seconds=scenario["grace"]), clock=clock)
    try:
        # Every example starts by marking, and ends with a collecting sweep raced by a
        # heartbeat and one more sweep, around whatever steps were drawn.
        ending = [("advance", scenario["grace"]), ("sweep-racing-heartbeat", 0), ("sweep", 0)]
        for action, arg in [("sweep", 0), *scenario["steps"], *ending]:
            if action == "advance":
                clock.now += arg
            elif action in ("sweep", "sweep-override"):
                check_one_sweep(valkey, rt=rt, model=model, clock=clock, action=action, racer=None)
            elif action == "sweep-racing-heartbeat":
                # Race the heartbeat of a due candidate when there is one: only a due
                # session is about to be deleted.
                named = {spec.sid: spec for spec in specs}
                marked = sorted(named.keys() & model.candidates.keys())
                due = [s for s in marked if clock.now - model.candidates[s] >= model.grace]
                pool = due or marked or sorted(named)
                racer = named[pool[arg % len(pool)]]
                check_one_sweep(valkey, rt=rt, model=model, clock=clock, action=action, racer=racer)
            else:
                change_session(valkey, model, action, specs[arg])
    finally:
        rt.close()


def change_session(valkey: redis.Redis, model: Model, action: str, spec: SessionSpec) -> None:
    if action == "heartbeat-on":
        valkey.set(spec.heartbeat_key, "1")
        model.heartbeat[spec.sid] = spec.heartbeat_key
        model.blinked[spec.sid] = True
    elif action == "heartbeat-off":
        valkey.delete(spec.heartbeat_key)
        model.heartbeat[spec.sid] = None
    elif action == "delete":  # someone else (the collect handler) removed its keys
        if model.data[spec.sid]:
            valkey.delete(*model.data[spec.sid])
        model.data[spec.sid] = set()
    else:  # "rewrite": the id is used again
        pipe = valkey.pipeline(transaction=False)
        for key, kind in spec.data_keys().items():
            write_key(pipe, key, kind)
        pipe.execute()
        model.data[spec.sid] = set(spec.data_keys())


def check_one_sweep(
    valkey: redis.Redis,
    *,
    rt: Runtime,
    model: Model,
    clock: Clock,
    action: str,
    racer: SessionSpec | None,
) -> None:
    before = keys_of(valkey)
    live_at_start = {sid for sid, hb in model.heartbeat.items() if hb}
    blinked = dict(model.blinked)
    fired = install_heartbeat_race(valkey, rt, racer) if racer is not None else [False]

    result = sweep(rt, override="blast-radius" if action == "sweep-override" else None)

    if racer is not None:
        rt.valkey.__dict__.pop("live_sessions", None)
        # Had the sweep no collecting step to race with, the heartbeat comes just after it.
        valkey.set(racer.heartbeat_key, "1")
    raced = racer.sid if racer is not None and fired[0] else None
    stopped, collected = model.sweep(clock.now, override=action == "sweep-override", racer=raced)
    if racer is not None:
        model.heartbeat[racer.sid] = racer.heartbeat_key
        model.blinked[racer.sid] = True
    after = keys_of(valkey)

    assert result.complete
    assert (result.stopped or "").startswith("blast-radius") == stopped, result.stopped
    event("guard fired" if stopped else "collected" if collected else "nothing due")
    if raced:
        event("heartbeat appeared during the collecting step")
        if racer is not None and racer.sid in result.due:
            event("a due session saved by the check made with the deletion")
    if stopped:
        assert before - after <= {CANDIDATES}, "a stopped sweep deleted keys"
    # (1) a session with a heartbeat when the sweep ran (or one that appeared before the
    # deletion) keeps every key
    for sid in live_at_start | ({racer.sid} if racer else set()):
        owned = {k for k in before if KEYSPACE.session_of(k) == sid}
        assert owned <= after, f"live session {sid!r} lost keys"
    # (2) every due session not saved by a guard or a heartbeat is gone entirely
    for sid in collected:
        assert not {k for k in after if KEYSPACE.session_of(k) == sid}, f"{sid!r} left keys"
        if blinked.get(sid):
            event("collected after a heartbeat no sweep saw")
    # (3) nothing outside the session namespace is touched
    for key, value in BYSTANDERS.items():
        assert valkey.get(key) == value.encode()
    # (4) the candidates hash only names sessions that still have keys
    owners = {KEYSPACE.session_of(k) for k in after}
    raw = valkey.hgetall(CANDIDATES)
    stored = {k.decode() if isinstance(k, bytes) else k: float(v) for k, v in raw.items()}
    assert stored.keys() <= owners
    # ... and the whole state is exactly what the rule predicts
    assert stored == model.candidates
    assert after == model.keys()


def install_heartbeat_race(valkey: redis.Redis, rt: Runtime, racer: SessionSpec) -> list[bool]:
    """Write ``racer``'s heartbeat right after the collect step's up-front liveness check, so
    that only the check done atomically with each page of deletions can still see it."""
    store = rt.valkey
    real_check: Callable[..., set[str]] = type(store).live_sessions.__get__(store)
    fired = [False]

    def check_then_revive(ids: Any) -> set[str]:
        answer = real_check(ids)
        if not fired[0]:
            valkey.set(racer.heartbeat_key, "1")
            fired[0] = True
        return answer

    store.__dict__["live_sessions"] = check_then_revive
    return fired
