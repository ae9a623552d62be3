"""Throttling: the retry policy for a shared quota (docs/design.md, "Throttling").

A throttled call (``ThrottlingException`` and the SDKs' other throttling codes, or
HTTP 429) is not a fault: the account's quota (Parameter Store: about 40 calls a second,
shared by every environment) is busy. So, unlike the three quick attempts of a fault, a
throttled call is retried until its window ends: the service's budget, or without one
``THROTTLE_WINDOW`` (8 s) from the first attempt, inside Lambda's 10 s INIT. The wait
before each retry is full jitter on the SDKs' standard scale (1 s * 2 ** retry, 20 s at
most), shrunk by the cube of the share of the window left, at least 20 ms and at most
half of what is left: a call that has waited longer retries sooner, so it wins the
quota's tokens before younger calls. Each process also paces itself for 2 s after a
throttle (5 turns a second, 5 at once), except for calls past half of their window.

Everything here runs on an injected clock and sleep (no test sleeps) and an injected
draw (``max``: the highest wait the jitter may pick, so waits are exact). The
black-box side (the real extension against a throttling fake) is in
tests/test_reliability.py, and the fleet figures in bench/fleet.py.
"""

import pytest

import extension
from conftest import FakeClock, RecordingLog, stand_in

THROTTLED = ("ThrottlingException", "Rate exceeded")


def highest(low, high):
    """The draw that picks the longest wait the jitter allows."""
    return high


def throttle_error():
    return extension.AwsError(400, *THROTTLED)


def make_client(clock, sleep, attempts, draw=highest):
    config, _ = extension.load_config({"AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "k",
                                       "AWS_SECRET_ACCESS_KEY": "s"})
    log = RecordingLog()
    credentials = extension.CredentialProvider(config, log)
    credentials.resolve()
    client = extension.ServiceClient("ssm", "http://127.0.0.1:9", "us-east-1", credentials, 3,
                                     extension.Stats(), log, clock, sleep, draw)
    stand_in(client, "_attempt", attempts)
    return client


class Script:
    """A stand-in for ServiceClient._attempt: each attempt takes `latency` seconds of the
    fake clock, then raises or returns the next scripted outcome (the last one repeats);
    the clock time of each attempt's start is kept in .started."""

    def __init__(self, clock, outcomes, latency=0.01):
        self.clock, self.outcomes, self.latency = clock, list(outcomes), latency
        self.started = []

    def __call__(self, target, body, credentials, deadline, attempts_left):
        self.started.append(self.clock.now)
        self.clock.advance(self.latency)
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def sleeper(clock, slept):
    def sleep(seconds):
        slept.append(seconds)
        clock.advance(seconds)
    return sleep


# ------------------------------------------------------------- the wait before a retry


def test_the_wait_starts_on_the_sdks_scale_and_doubles():
    window = extension.THROTTLE_WINDOW
    assert extension.throttle_backoff(1, window, window, highest) == 1.0
    assert extension.throttle_backoff(2, window, window, highest) == 2.0
    # Never more than half of what is left: 4 s of 8, though 2 ** 2 s would be 4 too
    # and 2 ** 3 s would be 8.
    assert extension.throttle_backoff(3, window, window, highest) == 4.0
    assert extension.throttle_backoff(4, window, window, highest) == 4.0


def test_a_call_that_has_waited_longer_waits_less():
    window = 8.0
    # The same retry number at ages 0, 2, 4 and 6 s: the bound shrinks with the cube of
    # the share of the window left (1, 27/64, 1/8, 1/64 of 2 s).
    waits = [extension.throttle_backoff(2, window - age, window, highest) for age in (0, 2, 4, 6)]
    assert waits == [2.0, 2.0 * 27 / 64, 0.25, 2.0 / 64]
    # Near the end, the floor: a retry every 20 ms at most, while time is left.
    assert extension.throttle_backoff(5, 0.2, window, highest) == extension.THROTTLE_FLOOR


def test_the_jitter_is_full_jitter_from_zero():
    draws = []

    def record(low, high):
        draws.append((low, high))
        return low

    assert extension.throttle_backoff(2, 8.0, 8.0, record) == 0
    assert draws == [(0, 2.0)]


def test_no_retry_when_less_than_two_floors_are_left():
    assert extension.throttle_backoff(1, 2 * extension.THROTTLE_FLOOR - 0.001, 8.0, highest) is None
    assert extension.throttle_backoff(1, 2 * extension.THROTTLE_FLOOR, 8.0, highest) is not None


# --------------------------------------------------------------------- the call's window


def test_without_a_budget_throttles_are_retried_for_the_window_then_aws_error_is_raised():
    clock, slept = FakeClock(100.0), []
    error = throttle_error()
    script = Script(clock, [error])
    client = make_client(clock, sleeper(clock, slept), script)
    with pytest.raises(extension.AwsError) as caught:
        client.call("AmazonSSM.GetParameter", {}, None, lambda answer: answer)
    assert caught.value is error  # AWS's own error: status 400, ThrottlingException
    assert (caught.value.status, caught.value.error_type) == (400, "ThrottlingException")
    assert len(script.started) > extension.MAX_ATTEMPTS
    # Every attempt started inside the window: 8 s from the first attempt.
    assert script.started[0] == 100.0
    assert max(script.started) < 100.0 + extension.THROTTLE_WINDOW
    # And the last retries came close to its end (a call gets attempts until it ends).
    assert max(script.started) > 100.0 + extension.THROTTLE_WINDOW - 0.2


def test_with_a_budget_throttles_are_retried_until_the_budget_then_aws_error():
    clock, slept = FakeClock(100.0), []
    script = Script(clock, [throttle_error()])
    client = make_client(clock, sleeper(clock, slept), script)
    with pytest.raises(extension.AwsError) as caught:
        client.call("AmazonSSM.GetParameter", {}, 103.0, lambda answer: answer)
    assert caught.value.error_type == "ThrottlingException"
    assert max(script.started) < 103.0
    assert clock.now <= 103.0
    assert len(script.started) > extension.MAX_ATTEMPTS


def test_throttles_then_success_returns_the_value():
    clock, slept = FakeClock(100.0), []
    script = Script(clock, [throttle_error()] * 6 + [{"Parameter": "value"}])
    client = make_client(clock, sleeper(clock, slept), script)
    assert client.call("AmazonSSM.GetParameter", {}, None, lambda answer: answer) == {"Parameter": "value"}
    assert len(script.started) == 7
    # Waits (draw: the highest allowed) follow the rule, from the clock: the first retry
    # came 0.01 s (the attempt) into the 8 s window.
    assert slept[0] == pytest.approx((1 - 0.01 / extension.THROTTLE_WINDOW) ** 3)


def test_throttles_do_not_use_up_the_three_attempts_of_faults():
    clock, slept = FakeClock(100.0), []
    fault = extension.UpstreamUnreachable("reset")
    script = Script(clock, [throttle_error(), fault, throttle_error(), fault, throttle_error(), "ok"])
    client = make_client(clock, sleeper(clock, slept), script)
    assert client.call("AmazonSSM.GetParameter", {}, None, lambda answer: answer) == "ok"
    # But faults still have three attempts at most, throttles or not.
    script = Script(clock, [throttle_error(), fault, fault, fault, "ok"])
    client = make_client(clock, sleeper(clock, slept), script)
    with pytest.raises(extension.UpstreamUnreachable):
        client.call("AmazonSSM.GetParameter", {}, None, lambda answer: answer)
    assert len(script.started) == 4


@pytest.mark.parametrize("error", [extension.AwsError(429, "UnknownError", ""),
                                   extension.AwsError(400, "TooManyRequestsException", ""),
                                   extension.AwsError(400, "RequestLimitExceeded", "")])
def test_every_throttling_answer_gets_the_policy(error):
    assert error.throttling and error.transient and error.retryable
    clock, slept = FakeClock(100.0), []
    script = Script(clock, [error] * 5 + ["ok"])
    client = make_client(clock, sleeper(clock, slept), script)
    assert client.call("AmazonSSM.GetParameter", {}, None, lambda answer: answer) == "ok"


@pytest.mark.parametrize("error", [extension.AwsError(500, "InternalServerError", ""),
                                   extension.AwsError(400, "AccessDeniedException", ""),
                                   extension.UpstreamUnreachable("reset"), extension.UpstreamTimeout("slow")])
def test_other_errors_are_not_throttling(error):
    assert not error.throttling


# ------------------------------------------------------------------ pacing per process


def test_after_a_throttle_the_calls_of_the_process_take_turns():
    clock, slept = FakeClock(100.0), []
    sleep = sleeper(clock, slept)
    # The first call is throttled once, then served: the service is now paced.
    script = Script(clock, [throttle_error(), "ok"], latency=0.0)
    client = make_client(clock, lambda seconds: sleep(seconds), script)
    client.call("AmazonSSM.GetParameter", {}, None, lambda answer: answer)
    slept.clear()
    sleep = slept.append  # from now on sleeps are recorded, not spent
    # Ten calls at one instant (as ten concurrent requests would come): PACE_BURST go at
    # once, each other one PACE_RATE later than the one before.
    script.outcomes = ["ok"]
    for _ in range(10):
        client.call("AmazonSSM.GetParameter", {}, None, lambda answer: answer)
    interval = 1 / extension.PACE_RATE
    # The retry above already took a turn: four more go at once, then one per interval
    # (a wait of a rounding error is no wait).
    assert [seconds for seconds in slept if seconds > 1e-9] == pytest.approx([interval * n for n in range(1, 7)])


def test_pacing_ends_pace_seconds_after_the_last_throttle():
    clock, slept = FakeClock(100.0), []
    script = Script(clock, [throttle_error(), "ok"], latency=0.0)
    client = make_client(clock, slept.append, script)
    client.call("AmazonSSM.GetParameter", {}, None, lambda answer: answer)
    clock.advance(extension.PACE_SECONDS)
    slept.clear()
    script.outcomes = ["ok"]
    for _ in range(20):
        client.call("AmazonSSM.GetParameter", {}, None, lambda answer: answer)
    assert slept == []


def test_a_call_past_half_of_its_window_is_not_held_back():
    clock, slept = FakeClock(100.0), []
    script = Script(clock, [throttle_error(), "ok"], latency=0.0)
    client = make_client(clock, slept.append, script)
    client.call("AmazonSSM.GetParameter", {}, None, lambda answer: answer)
    slept.clear()
    script.outcomes = ["ok"]
    # A budget of 1 s: a turn later than 0.5 s from now is not waited for.
    for _ in range(12):
        client.call("AmazonSSM.GetParameter", {}, clock.now + 1.0, lambda answer: answer)
    assert max(slept) <= 0.5
    assert len(slept) < 12  # the calls whose turn came too late went at once


# ------------------------------------------------------- what the fleet gets (simulated)


def simulate(backoff, functions=30, reads=8, rate=10.0, seed=0):
    """Calls that failed when `functions` functions each read `reads` values one after
    the other against a quota of `rate` calls a second (a token bucket holding a second's
    worth), every throttled call retrying after backoff(retry, remaining, uniform) or
    failing when it returns None. All on a simulated clock."""
    import heapq
    import random

    rng = random.Random(seed)
    bucket = {"tokens": rate, "at": 0.0}
    left = [reads] * functions
    calls = [(rng.uniform(0, 0.05), function, 0, None) for function in range(functions)]
    heapq.heapify(calls)
    failed = 0
    while calls:
        at, function, retry, first = heapq.heappop(calls)
        first = at if first is None else first
        bucket["tokens"] = min(rate, bucket["tokens"] + (at - bucket["at"]) * rate)
        bucket["at"] = at
        if bucket["tokens"] >= 1:
            bucket["tokens"] -= 1
        else:
            wait = backoff(retry + 1, first + extension.THROTTLE_WINDOW - at, rng.uniform)
            if wait is not None:
                heapq.heappush(calls, (at + wait, function, retry + 1, first))
                continue
            failed += 1
        left[function] -= 1
        if left[function]:
            heapq.heappush(calls, (at + 0.01, function, 0, None))  # the function's next read
    return failed


def test_older_calls_win_a_contended_quota():
    """30 functions reading 8 values each, one after the other, at 10 calls a second: each
    call waits about 3 s for its turn, well inside its 8 s window, yet with the SDKs'
    full jitter (same scale, retried within the same window) some call loses every draw.
    With the age rule, none does."""
    window = extension.THROTTLE_WINDOW

    def with_age(retry, remaining, uniform):
        return extension.throttle_backoff(retry, remaining, window, uniform)

    def without_age(retry, remaining, uniform):
        wait = uniform(0, min(extension.THROTTLE_CAP, extension.THROTTLE_BASE * 2 ** (retry - 1)))
        return wait if wait < remaining else None

    assert [simulate(with_age, seed=seed) for seed in range(4)] == [0, 0, 0, 0]
    assert sum(simulate(without_age, seed=seed) for seed in range(4)) > 0
