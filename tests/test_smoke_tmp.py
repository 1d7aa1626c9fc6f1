from session_gc_local import seed
from conftest import keys_of, PREFIX
from session_gc.collect import collect_sessions
from session_gc.full import full_gc
from session_gc.sweep import sweep


def test_smoke(rt, valkey, pg):
    by = seed.write_bystanders(valkey, PREFIX, 2)
    seed.write_session(valkey, PREFIX, "a", live=False)
    seed.write_session(valkey, PREFIX, "abcd", live=False)
    seed.write_session(valkey, PREFIX, "b", live=True)
    seed.write_session(valkey, PREFIX, "t", live=False, tagged=True)
    seed.add_logs(pg, "a", count=10)
    seed.add_logs(pg, "a", count=5, age_hours=30)
    r = collect_sessions(rt, ["a", "b", "t"])
    print({k: v.to_json() for k, v in r.items()})
    print(sorted(keys_of(valkey)))
    print(full_gc(rt, dry_run=True).to_json())
    print(sweep(rt, dry_run=True).to_json())
    print(sweep(rt).to_json())
    print(full_gc(rt).to_json())
    print(sorted(keys_of(valkey)))
    assert set(by) <= keys_of(valkey)
