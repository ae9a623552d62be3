"""Unit tests of the cache (TTLCache) and of the store around it (Store: one AWS call per
miss, stale answers on transient failures), with an injected clock: no test sleeps."""

import threading

import pytest

import extension
from conftest import FakeClock, RecordingLog

# ----------------------------------------------------------------------------- TTLCache

def test_fresh_value_is_returned_until_its_ttl_ends():
    clock = FakeClock()
    cache = extension.TTLCache(10, clock=clock)
    cache.put("a", b"1", ttl=300)
    clock.advance(299.9)
    assert cache.get("a") == b"1"
    clock.advance(0.1)
    assert cache.get("a") is None


def test_expired_entry_is_dropped_when_no_stale_use_is_allowed():
    clock = FakeClock()
    cache = extension.TTLCache(10, max_stale=0, clock=clock)
    cache.put("a", b"1", ttl=5)
    clock.advance(5)
    assert cache.get("a") is None
    assert len(cache) == 0


def test_expired_entry_is_kept_for_stale_use_within_the_bound_only():
    clock = FakeClock()
    cache = extension.TTLCache(10, max_stale=60, clock=clock)
    cache.put("a", b"1", ttl=5)
    clock.advance(30)
    assert cache.get("a") is None                 # never served as fresh
    assert cache.get_stale("a") == b"1"           # but held for a transient failure
    clock.advance(35)                             # 65 s past expiry > 60
    assert cache.get_stale("a") is None
    assert cache.get("a") is None
    assert len(cache) == 0


def test_least_recently_used_entry_is_evicted_at_the_size_cap():
    cache = extension.TTLCache(2, clock=FakeClock())
    cache.put("a", b"1", 300)
    cache.put("b", b"2", 300)
    assert cache.get("a") == b"1"                 # a is now the most recently used
    cache.put("c", b"3", 300)
    assert cache.get("b") is None                 # b was the least recently used
    assert cache.get("a") == b"1"
    assert cache.get("c") == b"3"
    assert len(cache) == 2


def test_size_cap_holds_under_churn():
    cache = extension.TTLCache(100, clock=FakeClock())
    for number in range(10_000):
        cache.put(f"name-{number}", b"x", 300)
        assert len(cache) <= 100
    assert cache.get("name-9999") == b"x"
    assert cache.get("name-0") is None


def test_put_replaces_a_value_and_renews_its_ttl():
    clock = FakeClock()
    cache = extension.TTLCache(10, clock=clock)
    cache.put("a", b"old", 10)
    clock.advance(8)
    cache.put("a", b"new", 10)
    clock.advance(8)
    assert cache.get("a") == b"new"
    assert len(cache) == 1


def test_dead_entries_at_the_cold_end_are_dropped_on_put():
    clock = FakeClock()
    cache = extension.TTLCache(10, max_stale=0, clock=clock)
    cache.put("old-1", b"1", 1)
    cache.put("old-2", b"2", 1)
    clock.advance(2)
    cache.put("new", b"3", 300)
    assert len(cache) == 1


# ----------------------------------------------------------------------------- Store

KEY = ("ssm", "/app/k", None, False)
OTHER = ("ssm", "/app/other", None, False)


def make_store(max_items=10, max_stale=300):
    clock = FakeClock()
    stats = extension.Stats()
    log = RecordingLog()
    store = extension.Store(extension.TTLCache(max_items, max_stale, clock), stats, log)
    return store, clock, stats, log


def counting_fetch(value):
    """A fetch that returns value and counts its calls in fetch.calls."""
    def fetch(deadline=None):
        fetch.calls += 1
        return value

    fetch.calls = 0
    return fetch


def test_hit_after_miss_makes_one_call():
    store, _, stats, _ = make_store()
    fetch = counting_fetch(b"value")
    assert store.get(KEY, fetch, ttl=300) == (b"value", "miss")
    assert store.get(KEY, fetch, ttl=300) == (b"value", "hit")
    assert fetch.calls == 1
    assert stats.snapshot()["hits"] == 1 and stats.snapshot()["misses"] == 1


def test_ttl_zero_bypasses_the_cache():
    store, _, _, _ = make_store()
    fetch = counting_fetch(b"value")
    assert store.get(KEY, fetch, ttl=0) == (b"value", "bypass")
    assert store.get(KEY, fetch, ttl=0) == (b"value", "bypass")
    assert fetch.calls == 2
    assert len(store.cache) == 0


def test_refresh_bypasses_a_fresh_entry_and_stores_the_new_value():
    store, _, _, _ = make_store()
    values = iter([b"one", b"two"])
    store.get(KEY, lambda deadline: next(values), ttl=300)
    assert store.get(KEY, lambda deadline: next(values), ttl=300, refresh=True) == (b"two", "miss")
    assert store.get(KEY, lambda deadline: b"never", ttl=300) == (b"two", "hit")


def concurrent_gets(store, outcome, workers):
    """workers threads ask for KEY at the same moment while the one AWS call is held
    open; outcome is the value it returns or the error it raises. Returns (number of
    calls, each thread's result or error type)."""
    start = threading.Barrier(workers)
    calls = []

    def fetch(deadline=None):
        calls.append(1)
        # Held until every other thread is surely waiting on this flight.
        threading.Event().wait(0.3)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    results = []

    def worker():
        start.wait(5)
        try:
            results.append(store.get(KEY, fetch, 300)[0])
        except extension.UpstreamError as error:
            results.append(type(error).__name__)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    # No flight is left behind: an uncached get now makes its own call at once.
    after = counting_fetch(b"after")
    assert store.get(KEY, after, 0) == (b"after", "bypass")
    assert after.calls == 1
    return len(calls), results


def test_concurrent_misses_for_one_key_make_one_call():
    store, _, _, _ = make_store()
    calls, results = concurrent_gets(store, b"value", workers=32)
    assert calls == 1
    assert results == [b"value"] * 32


def test_concurrent_waiters_share_the_leaders_error_and_nothing_is_cached():
    store, _, _, _ = make_store()
    calls, results = concurrent_gets(store, extension.AwsError(400, "ParameterNotFound", ""), workers=8)
    assert calls == 1
    assert results == ["AwsError"] * 8
    assert len(store.cache) == 0


def test_stale_value_answers_a_transient_failure_within_the_bound():
    store, clock, stats, log = make_store(max_stale=60)
    store.get(KEY, lambda deadline: b"old", ttl=10)
    clock.advance(20)

    def failing(deadline=None):
        raise extension.UpstreamUnreachable("down")

    assert store.get(OTHER, lambda deadline: b"x", ttl=10)[1] == "miss"  # another key, unaffected
    assert store.get(KEY, failing, ttl=10) == (b"old", "stale")
    assert stats.snapshot()["stale"] == 1
    assert any(level == "warn" and "stale" in message for level, message in log.lines)
    # The next request tries AWS again rather than caching the stale answer as fresh.
    assert store.get(KEY, lambda deadline: b"new", ttl=10) == (b"new", "miss")


def test_stale_value_is_not_served_past_the_bound():
    store, clock, _, _ = make_store(max_stale=60)
    store.get(KEY, lambda deadline: b"old", ttl=10)
    clock.advance(10 + 61)

    def failing(deadline=None):
        raise extension.UpstreamTimeout("slow")

    with pytest.raises(extension.UpstreamTimeout):
        store.get(KEY, failing, ttl=10)


def test_client_errors_never_fall_back_to_a_stale_value():
    store, clock, _, _ = make_store(max_stale=600)
    store.get(KEY, lambda deadline: b"old", ttl=10)
    clock.advance(20)
    for status, error_type in ((400, "ParameterNotFound"), (400, "AccessDeniedException"),
                               (404, "ResourceNotFoundException")):
        def failing(deadline, status=status, error_type=error_type):
            raise extension.AwsError(status, error_type, "")

        with pytest.raises(extension.AwsError):
            store.get(KEY, failing, ttl=10)


def test_throttling_and_server_errors_are_transient_client_errors_are_not():
    assert extension.AwsError(400, "ThrottlingException", "").transient
    assert extension.AwsError(400, "TooManyRequestsException", "").transient
    assert extension.AwsError(429, "Whatever", "").transient
    assert extension.AwsError(503, "ServiceUnavailable", "").transient
    assert not extension.AwsError(400, "ParameterNotFound", "").transient
    assert not extension.AwsError(400, "AccessDeniedException", "").transient
    assert not extension.AwsError(400, "ValidationException", "").transient
