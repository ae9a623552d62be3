"""PARAMETERS_SECRETS_EXTENSION_REFRESH_AHEAD: a hit on an entry older than that share of
its TTL is answered at once from the cache and starts one refresh of the key in the
background (docs/configuration.md, "Refresh ahead").

The Store on fake clocks: the refresh runs in a thread of its own, so each test waits
for it through the call it makes (an Event), never by sleeping a set time. The rules
checked: the threshold, single flight with misses and other refreshes, refreshNow's
rate of one call per key per second, a failure that changes nothing (value and original
expiry kept, one WARN), an entry that expires during its refresh joining that call, no
refresh once stopped, a refresh that ends past its deadline (cut by a Lambda freeze)
or after the stop dropped, the deadline of a refresh without a budget, batches, and 0 meaning never. The
black-box side (the real extension against the fake AWS) is at the end.
"""

import threading
import time

import pytest

import extension
from conftest import CACHE_HEADER, SSM_GET, FakeClock, RecordingLog, ssm_path, wait_for

KEY = ("ssm", "/app/p", None, False)
TTL = 100


class Clocks(FakeClock):
    """The monotonic clock (now), and the wall clock beside it: advance moves both, as time
    that passes while the process runs does."""

    def __init__(self):
        super().__init__()
        self.wall = FakeClock(1_800_000_000.0)

    def advance(self, seconds):
        super().advance(seconds)
        self.wall.advance(seconds)


def make_store(ahead=0.8, max_stale=300):
    clock, log, stats = Clocks(), RecordingLog(), extension.Stats()
    cache = extension.TTLCache(10, max_stale, clock, clock.wall, ahead)
    return extension.Store(cache, stats, log, clock), clock, log, stats


class Calls:
    """call(deadline) for Store.get: each call records its deadline, then (when held)
    waits for release, then returns or raises the next outcome (the last repeats)."""

    def __init__(self, *outcomes, held=False):
        self.outcomes = list(outcomes)
        self.deadlines = []
        self.started = threading.Event()
        self.ended = threading.Event()
        self.release = threading.Event()
        if not held:
            self.release.set()

    def __call__(self, deadline):
        self.deadlines.append(deadline)
        self.started.set()
        assert self.release.wait(10)
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        self.ended.set()
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    @property
    def made(self):
        return len(self.deadlines)


def settled(store):
    """Wait until no flight is left (the background refresh has ended)."""
    wait_for(lambda: not store._flights, timeout=10, message="the refresh to end")


def test_a_hit_before_the_threshold_does_not_refresh_and_one_after_it_does():
    store, clock, _, stats = make_store()
    assert store.get(KEY, Calls(b"one"), TTL) == (b"one", "miss")
    refresh = Calls(b"two")
    clock.advance(79)
    assert store.get(KEY, refresh, TTL) == (b"one", "hit")
    assert refresh.made == 0
    clock.advance(1)
    assert store.get(KEY, refresh, TTL) == (b"one", "hit")  # at once, from the cache
    settled(store)
    assert refresh.made == 1
    assert store.get(KEY, Calls(b"never"), TTL) == (b"two", "hit")
    # A new TTL from the refresh: fresh until 80 + 100, and due again at 80 + 80.
    clock.advance(99)
    assert store.get(KEY, Calls(b"three"), TTL) == (b"two", "hit")
    settled(store)
    assert store.get(KEY, Calls(b"never"), TTL) == (b"three", "hit")
    assert stats.snapshot()["refreshed_ahead"] == 2
    assert stats.snapshot()["misses"] == 1


def test_zero_never_refreshes_ahead():
    store, clock, _, stats = make_store(ahead=0.0)
    store.get(KEY, Calls(b"one"), TTL)
    clock.advance(99.9)
    never = Calls(b"never")
    assert store.get(KEY, never, TTL) == (b"one", "hit")
    assert never.made == 0 and not store._flights
    assert stats.snapshot()["refreshed_ahead"] == 0


def test_one_refresh_at_a_time_and_a_miss_during_it_joins_its_call():
    store, clock, _, _ = make_store()
    store.get(KEY, Calls(b"one"), TTL)
    clock.advance(90)
    refresh = Calls(b"two", held=True)
    assert store.get(KEY, refresh, TTL) == (b"one", "hit")
    assert refresh.started.wait(10)
    other = Calls(b"never")
    assert store.get(KEY, other, TTL) == (b"one", "hit")  # a second hit: no second refresh
    # The entry expires while its refresh runs: the next request misses and joins it.
    clock.advance(11)
    joined = []
    waiter = threading.Thread(target=lambda: joined.append(store.get(KEY, other, TTL)))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive()
    refresh.release.set()
    waiter.join(10)
    assert joined == [(b"two", "miss")]
    assert (refresh.made, other.made) == (1, 0)


def test_a_failed_refresh_changes_nothing_and_warns():
    store, clock, log, _ = make_store()
    store.get(KEY, Calls(b"one"), TTL)
    clock.advance(85)
    failing = Calls(extension.UpstreamUnreachable("down"))
    assert store.get(KEY, failing, TTL) == (b"one", "hit")
    settled(store)
    assert [message for level, message in log.lines if level == "warn"] == [
        "refreshing ssm '/app/p' ahead of its expiry failed (down); the cached value stays until it expires"]
    # The value and its original expiry stay: a hit until 100 (another refresh, failing
    # too, a second later or more), then a miss, whose failure the old value answers.
    clock.advance(14.9)
    assert store.get(KEY, failing, TTL) == (b"one", "hit")
    settled(store)
    clock.advance(0.1)
    assert store.get(KEY, failing, TTL) == (b"one", "stale")
    assert failing.made == 3  # two refreshes ahead, then the miss



def test_a_non_transient_failure_does_not_drop_the_value_either():
    store, clock, _, _ = make_store()
    store.get(KEY, Calls(b"one"), TTL)
    clock.advance(85)
    store.get(KEY, Calls(extension.AwsError(400, "ParameterNotFound", "")), TTL)
    settled(store)
    assert store.get(KEY, Calls(b"never"), TTL) == (b"one", "hit")


def test_at_most_one_refresh_call_per_key_per_second():
    store, clock, _, _ = make_store()
    store.get(KEY, Calls(b"one"), TTL)
    clock.advance(85)
    failing = Calls(extension.UpstreamUnreachable("down"))
    for _ in range(5):  # the entry stays due after a failure, but the rate holds
        store.get(KEY, failing, TTL)
        settled(store)
    assert failing.made == 1
    clock.advance(extension.REFRESH_INTERVAL)
    store.get(KEY, failing, TTL)
    settled(store)
    assert failing.made == 2


def test_no_refresh_once_stopped():
    store, clock, _, _ = make_store()
    store.get(KEY, Calls(b"one"), TTL)
    clock.advance(90)
    store.stopped = True
    never = Calls(b"never")
    assert store.get(KEY, never, TTL) == (b"one", "hit")
    assert never.made == 0 and not store._flights


def test_a_refresh_cut_by_a_freeze_is_dropped():
    store, clock, log, _ = make_store()
    store.get(KEY, Calls(b"one"), TTL)
    clock.advance(81)
    refresh = Calls(b"two", held=True)
    store.get(KEY, refresh, TTL)
    assert refresh.started.wait(10)
    # A Lambda freeze longer than the refresh's deadline (10 s without a budget): at thaw
    # its answer comes, past the deadline.
    clock.advance(extension.ATTEMPT_TIMEOUT_WITHOUT_BUDGET + 1)
    refresh.release.set()
    settled(store)
    assert store.get(KEY, Calls(b"never"), TTL) == (b"one", "hit")  # untouched
    assert [level for level, _ in log.lines if level == "warn"] == []
    assert ("debug", "a refresh ahead of ssm '/app/p' ended past its deadline or the stop: dropped") in log.lines


def test_a_refresh_that_ends_after_the_stop_is_dropped():
    store, clock, log, _ = make_store()
    store.get(KEY, Calls(b"one"), TTL)
    clock.advance(90)
    refresh = Calls(b"two", held=True)
    store.get(KEY, refresh, TTL)
    assert refresh.started.wait(10)
    store.stopped = True  # SHUTDOWN came meanwhile
    refresh.release.set()
    settled(store)
    assert store.get(KEY, Calls(b"never"), TTL) == (b"one", "hit")


def test_a_refresh_without_a_budget_ends_within_an_attempt_and_with_one_keeps_it():
    store, clock, _, _ = make_store()
    store.get(KEY, Calls(b"one"), TTL)
    clock.advance(90)
    refresh = Calls(b"two")
    store.get(KEY, refresh, TTL)
    settled(store)
    assert refresh.deadlines == [clock.now + extension.ATTEMPT_TIMEOUT_WITHOUT_BUDGET]
    clock.advance(80)
    refresh = Calls(b"three")
    store.get(KEY, refresh, TTL, deadline=clock.now + 2.5)
    settled(store)
    assert refresh.deadlines == [clock.now + 2.5]


def test_a_batch_refreshes_its_due_keys_in_one_call():
    store, clock, _, _ = make_store()
    keys = [("ssm", f"/b/{index}", None, False) for index in range(3)]
    asked = []

    def call(wanted, deadline):
        asked.append(list(wanted))
        return {key: b"v%d" % len(asked) for key in wanted}

    store.get_many(keys[:2], call, TTL)
    clock.advance(50)
    store.get_many(keys[2:], call, TTL)
    clock.advance(35)  # keys 0 and 1 are 85 s old (due), key 2 is 35 s old
    results = store.get_many(keys, call, TTL)
    assert [results[key] for key in keys] == [(b"v1", "hit"), (b"v1", "hit"), (b"v2", "hit")]
    settled(store)
    assert asked == [keys[:2], keys[2:], keys[:2]]
    assert store.get_many(keys, call, TTL)[keys[0]] == (b"v3", "hit")


# ------------------------------------------------------------------ black box


def first_hit_after(ext, path, seconds):
    """Wait seconds, then GET path once; (status, cache header, value)."""
    time.sleep(seconds)
    status, headers, body = ext.get_json(path)
    return status, headers.get(CACHE_HEADER), body["Parameter"]["Value"] if status == 200 else body


@pytest.mark.slow
def test_a_hot_key_never_waits_on_aws_and_a_failed_refresh_keeps_its_value(fake, start_extension):
    """TTL 4 s, refresh ahead at 50 %: a hit after 2 s answers the cached value at once and
    refreshes it in the background; the next hit has the new value. A refresh that fails
    (500, after its retries) leaves the value with one WARN until the entry's own expiry;
    then a miss, whose failure the stale value answers."""
    fake.set_value("/hot", "v1")
    ext = start_extension(fake.url, env={"SSM_PARAMETER_STORE_TTL": 4,
                                         "PARAMETERS_SECRETS_EXTENSION_REFRESH_AHEAD": 50})
    path = ssm_path("/hot")
    assert first_hit_after(ext, path, 0) == (200, "miss", "v1")
    fake.set_value("/hot", "v2")
    assert first_hit_after(ext, path, 2.1) == (200, "hit", "v1")  # at once, and a refresh begins
    wait_for(lambda: ext.get_json(path)[2]["Parameter"]["Value"] == "v2", message="the refreshed value")
    stored = time.monotonic()  # v2 is fresh until about 4 s from now
    assert fake.calls(SSM_GET, "/hot") == 2
    status, headers, body = ext.get_json(path)
    assert (status, headers.get(CACHE_HEADER), body["Parameter"]["Value"]) == (200, "hit", "v2")

    fake.set_default("500", name="/hot")
    assert first_hit_after(ext, path, 2.1 - (time.monotonic() - stored))[:2] == (200, "hit")
    wait_for(lambda: "ahead of its expiry failed" in ext.stderr(), message="the WARN")
    assert fake.calls(SSM_GET, "/hot") == 5  # the refresh's three attempts
    assert first_hit_after(ext, path, 0) == (200, "hit", "v2")  # unchanged, original expiry
    time.sleep(max(0.0, 4.2 - (time.monotonic() - stored)))
    status, headers, body = ext.get_json(path)
    assert (status, headers.get(CACHE_HEADER), body["Parameter"]["Value"]) == (200, "stale", "v2")
    assert ext.stderr().count("ahead of its expiry failed") == 1
    assert "v1" not in ext.stderr() and "v2" not in ext.stderr()
