"""bench/refresh_ahead.py, the refresh-ahead benchmark: a tiny run prints both rows and the
figures that are exact whatever the machine. Times and targets are printed by the
benchmark, never asserted here.

Why a TTL of 2 s read for 2 s, not 1 s across windows: within the first TTL nothing can
expire (the loop ends before the first value does), so the counts are exact. With a 1 s
TTL, the refresh of the second window is held back by the one-call-per-second limit until
about the moment the value expires, and whether a request lands in between (and waits,
answered "miss") is a race: the benchmark shows it, a test cannot pin it."""

import re
import subprocess
import sys

import pytest

from conftest import ROOT, printed_table

BENCH = ROOT / "bench" / "refresh_ahead.py"


def table(text):
    """({setting: [cells]}, {setting: note}) from the printed table and its notes."""
    notes = dict(re.findall(r"^- (REFRESH_AHEAD [^:]+): (.*)$", text, re.MULTILINE))
    return printed_table(text, "setting "), notes


def summary(note):
    """The extension's shutdown summary as the notes quote it."""
    found = re.search(r"extension summary: ((?:\w+=\d+ ?)+)", note)
    assert found, note
    return {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", found.group(1))}


@pytest.mark.slow
def test_a_short_run_prints_both_settings_with_their_exact_counts():
    done = subprocess.run([sys.executable, str(BENCH), "--ttl", "2", "--seconds", "2"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "read every 5 ms (start to start) on one keep-alive connection for 2 s, TTL 2 s" in done.stdout
    rows, notes = table(done.stdout)
    assert set(rows) == set(notes) == {"REFRESH_AHEAD 0 (off)", "REFRESH_AHEAD 80"}
    # columns: requests, p50, p99, max, hit p99, hit / miss, AWS calls, a window, most in one, ...
    for setting, cells in rows.items():
        hits, misses = (int(n.replace(",", "")) for n in cells[5].split(" / "))
        assert misses == 1, (setting, cells)  # the first request, and no other: nothing expired
        assert hits + misses == int(cells[0].replace(",", "")), (setting, cells)
        counts = summary(notes[setting])
        # What the forwarder saw is what the extension counted; every request is a hit or a miss.
        assert counts["aws_calls"] == int(cells[6]), (setting, cells, counts)
        assert (counts["hits"], counts["misses"], counts["errors"], counts["stale"]) == (hits, 1, 0, 0)
        assert "0 WARN, 0 ERROR lines; exit 0" in notes[setting]
        assert "no answer after the first waited on AWS" in notes[setting]

    # Off: one miss, so one call, and nothing ahead.
    off = rows["REFRESH_AHEAD 0 (off)"]
    assert (off[6], off[8]) == ("1", "1")
    assert summary(notes["REFRESH_AHEAD 0 (off)"])["refreshed_ahead"] == 0
    # 80: the cold miss, then at most one refresh (at 1.6 s of the value's 2 s), never more.
    on = summary(notes["REFRESH_AHEAD 80"])
    assert on["refreshed_ahead"] in (0, 1)
    assert on["aws_calls"] == 1 + on["refreshed_ahead"]


def test_bad_options_are_refused():
    for option, value in (("--ahead", "0,100"), ("--ttl", "0")):
        done = subprocess.run([sys.executable, str(BENCH), option, value], capture_output=True, text=True,
                              timeout=30)
        assert done.returncode == 2, (option, done.stderr)
