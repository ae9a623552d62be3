"""The cache on two clocks, refreshNow's rate, and waits bounded by the waiter's deadline.

Fake clocks throughout: TTLCache and Store take the monotonic clock and the wall clock
as arguments, so nothing here sleeps.
"""

import threading

import pytest

import extension
from conftest import FakeClock, RecordingLog

KEY = ("ssm", "/app/p", None, False)


def make_store(max_stale=300):
    clock, wall = FakeClock(), FakeClock(1_800_000_000.0)
    cache = extension.TTLCache(10, max_stale, clock, wall)
    return extension.Store(cache, extension.Stats(), RecordingLog(), clock), clock, wall


def calls(*outcomes):
    """A call returning (or raising) each outcome in turn; made counts the calls."""
    pending = list(outcomes)

    def call(deadline=None):
        call.made += 1
        outcome = pending.pop(0) if len(pending) > 1 else pending[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    call.made = 0
    return call


# ------------------------------------------------------------------ two clocks


def test_an_entry_expires_when_the_wall_clock_passes_its_ttl_alone():
    # A restored snapshot: the monotonic clock did not count the months in between.
    store, clock, wall = make_store(max_stale=0)
    call = calls(b"old", b"new")
    assert store.get(KEY, call, 300) == (b"old", "miss")
    wall.now += 301
    assert store.get(KEY, call, 300) == (b"new", "miss")
    assert call.made == 2


def test_an_entry_expires_when_the_monotonic_clock_passes_its_ttl_alone():
    # A wall clock set back must not make a value live longer.
    store, clock, wall = make_store(max_stale=0)
    call = calls(b"old", b"new")
    store.get(KEY, call, 300)
    clock.now += 301
    wall.now -= 3600
    assert store.get(KEY, call, 300) == (b"new", "miss")


def test_stale_answers_are_bounded_on_the_wall_clock_too():
    store, clock, wall = make_store(max_stale=60)
    store.get(KEY, calls(b"old"), 10)
    wall.now += 30
    assert store.get(KEY, calls(extension.UpstreamUnreachable("down")), 10) == (b"old", "stale")
    wall.now += 100  # 130 s past the put: beyond expiry + max_stale on the wall clock
    with pytest.raises(extension.UpstreamUnreachable):
        store.get(KEY, calls(extension.UpstreamUnreachable("down")), 10)


def test_clear_drops_everything():
    store, _, _ = make_store()
    store.get(KEY, calls(b"v"), 300)
    store.clear()
    assert len(store.cache) == 0


# ------------------------------------------------------------------ refreshNow's rate


def test_refreshes_within_a_second_share_the_previous_refresh():
    store, clock, _ = make_store()
    call = calls(b"one", b"two", b"three", b"four")
    assert store.get(KEY, call, 300) == (b"one", "miss")
    # The first refresh after an ordinary fetch always calls AWS, however soon.
    assert store.get(KEY, call, 300, refresh=True) == (b"two", "miss")
    clock.now += 0.999
    assert store.get(KEY, call, 300, refresh=True) == (b"two", "hit")
    clock.now += 0.001
    assert store.get(KEY, call, 300, refresh=True) == (b"three", "miss")
    assert call.made == 3


def test_a_loop_of_refreshes_makes_one_call_a_second():
    store, clock, _ = make_store()
    call = calls(b"v")
    for _ in range(3000):  # three seconds of a tight loop, 1 ms apart
        store.get(KEY, call, 300, refresh=True)
        clock.now += 0.001
    assert call.made == 3


def test_an_ordinary_fetch_resets_the_rate():
    store, clock, wall = make_store(max_stale=0)
    call = calls(b"v")
    store.get(KEY, call, 1, refresh=True)
    clock.now += 2
    wall.now += 2
    store.get(KEY, call, 1)  # expired: an ordinary miss
    store.get(KEY, call, 1, refresh=True)  # at once: still a call
    assert call.made == 3


def test_a_shared_refresh_shares_the_error_too():
    store, clock, _ = make_store()
    store.get(KEY, calls(b"v"), 300)
    gone = calls(extension.AwsError(400, "ParameterNotFound", ""))
    for _ in range(2):
        with pytest.raises(extension.AwsError):
            store.get(KEY, gone, 300, refresh=True)
    assert gone.made == 1
    # The first miss, then the refresh that failed, then the request that shared its failure.
    counts = store.stats.snapshot()
    assert (counts["hits"], counts["misses"], counts["errors"]) == (0, 2, 2)


def test_a_refresh_that_finds_the_value_gone_drops_it():
    store, clock, _ = make_store()
    store.get(KEY, calls(b"v"), 300)
    with pytest.raises(extension.AwsError):
        store.get(KEY, calls(extension.AwsError(400, "ParameterNotFound", "")), 300, refresh=True)
    again = calls(extension.AwsError(400, "ParameterNotFound", ""))
    with pytest.raises(extension.AwsError):
        store.get(KEY, again, 300)  # not a hit: the deleted value is not served
    assert again.made == 1


@pytest.mark.parametrize("error", [extension.AwsError(400, "AccessDeniedException", ""),
                                   extension.AwsError(400, "ParameterNotFound", "")])
def test_a_non_transient_error_drops_the_value_and_never_serves_it_stale(error):
    store, clock, wall = make_store(max_stale=300)
    store.get(KEY, calls(b"v"), 10)
    clock.now += 11
    wall.now += 11
    with pytest.raises(extension.AwsError):
        store.get(KEY, calls(error), 10)
    with pytest.raises(extension.UpstreamUnreachable):
        store.get(KEY, calls(extension.UpstreamUnreachable("down")), 10)  # nothing stale left


def test_refresh_records_are_bounded_to_the_last_second():
    store, clock, _ = make_store()
    for index in range(100):
        store.get(("ssm", f"/k{index}", None, False), calls(b"v"), 300, refresh=True)
        clock.now += 0.1
    # Only the refreshes of the last second are remembered.
    assert len(store._refreshes) == 10


# ------------------------------------------------------------------ waits


def test_a_waiter_stops_at_its_own_deadline():
    store, clock, _ = make_store()
    release = threading.Event()
    started = threading.Event()

    def slow(deadline=None):
        started.set()
        release.wait(10)
        return b"late"

    leader = threading.Thread(target=store.get, args=(KEY, slow, 300), daemon=True)
    leader.start()
    assert started.wait(5)
    with pytest.raises(extension.UpstreamTimeout, match="waited for another request's AWS call"):
        store.get(KEY, calls(b"never"), 300, deadline=clock.now + 0.05)
    release.set()
    leader.join(5)
    assert store.get(KEY, calls(b"never"), 300) == (b"late", "hit")


def test_a_waiter_past_its_deadline_gets_a_stale_value():
    store, clock, wall = make_store(max_stale=300)
    store.get(KEY, calls(b"old"), 10)
    clock.now += 11
    wall.now += 11
    release = threading.Event()
    started = threading.Event()

    def slow(deadline=None):
        started.set()
        release.wait(10)
        return b"new"

    leader = threading.Thread(target=store.get, args=(KEY, slow, 10), daemon=True)
    leader.start()
    assert started.wait(5)
    assert store.get(KEY, calls(b"never"), 10, deadline=clock.now + 0.05) == (b"old", "stale")
    release.set()
    leader.join(5)


@pytest.mark.parametrize("outcome", [b"value", extension.AwsError(400, "ParameterNotFound", "no such parameter")],
                         ids=["value", "error"])
def test_a_request_that_waits_for_another_s_call_is_counted_as_that_call_s_answer(outcome):
    # Every request once, whoever called AWS: hits + misses + errors are the requests
    # answered, and aws_calls (counted by the client) shows what single flight saved.
    store, _, _ = make_store()
    release, started = threading.Event(), threading.Event()

    def slow(deadline=None):
        started.set()
        release.wait(10)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    leader = threading.Thread(target=lambda: store.get_many([KEY], lambda keys, deadline: {KEY: slow()}, 300),
                              daemon=True)
    leader.start()
    assert started.wait(5)
    begun = store.begin([KEY], 300)
    assert begun[1] == [] and [key for key, _ in begun[2]] == [KEY]  # it follows the leader's flight
    release.set()
    answer = store.settle(begun, calls(b"never"), 300)[KEY]
    leader.join(5)
    if isinstance(outcome, Exception):
        assert answer is outcome
        expected = {"hits": 0, "misses": 2, "errors": 2}  # both missed the cache, and both failed
    else:
        assert answer == (b"value", "miss")
        expected = {"hits": 0, "misses": 2, "errors": 0}
    counts = store.stats.snapshot()
    assert {name: counts[name] for name in expected} == expected
