"""The chaos audit itself: each check passes on a clean history and catches its fault.

The histories are written by hand (no processes), in the form the chaos children
write them; see tests/support/chaos.py.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from tests.support.chaos import SOURCE, Audit, Call
from tests.support.chaos_procs import MAX_ATTEMPTS, POISON, plan

WORKER, OTHER, KILLED = 101, 102, 103
clock = itertools.count(1)


def ids_with(fails: int, n: int = 1) -> list[str]:
    """``n`` ledger ids whose plan fails their first ``fails`` attempts."""
    found = (f"x-{i}" for i in itertools.count() if plan(f"x-{i}")[0] == fails)
    return list(itertools.islice(found, n))


def handled(lid: str, attempt: int, pid: int = WORKER, kind: str = "ok", msg_id: str = "") -> list[Call]:
    """A handler call: its start line and its end line (``kind``; None-like "" for cut off)."""
    msg_id = msg_id or f"m-{lid}"
    lines = [Call("start", float(next(clock)), msg_id, lid, attempt, pid, {})]
    if kind:
        lines.append(Call(kind, float(next(clock)), msg_id, lid, attempt, pid, {}))
    return lines


def dead_letter(lid: str, attempts: int = MAX_ATTEMPTS, **overrides: Any) -> Call:
    reason = f"PlannedFailure: attempt {attempts} of {lid} fails by plan"
    headers: dict[str, Any] = {
        "x_original_queue": SOURCE,
        "x_dead_letter_reason": reason,
        "x_dead_letter_time": "2026-01-02T03:04:05.678Z",
        "attempts": attempts,
    }
    headers.update(overrides)
    headers = {k: v for k, v in headers.items() if v is not None}
    return Call("dead", float(next(clock)), f"m-{lid}", lid, 1, OTHER, headers)


def clean_history() -> tuple[set[str], list[Call], list[Call]]:
    """Two plain messages, one that fails once, one poison: everything as planned."""
    plain = ids_with(0, 2)
    (once,) = ids_with(1)
    (poison,) = ids_with(POISON)
    calls = [*handled(plain[0], 1), *handled(plain[1], 1, OTHER)]
    calls += [*handled(once, 1, kind="fail"), *handled(once, 2)]
    calls += [c for a in range(1, MAX_ATTEMPTS + 1) for c in handled(poison, a, kind="fail")]
    return {*plain, once, poison}, calls, [dead_letter(poison)]


def problems(a: Audit, killed: set[int] | None = None, bound: int = 0, copies: bool = False) -> str:
    return "\n".join(a.check(killed or set(), bound, copies=copies))


def test_a_clean_history_passes() -> None:
    ids, calls, dead = clean_history()
    assert problems(Audit(ids, ids, calls, dead)) == ""


def test_a_confirmed_message_never_handled_is_lost() -> None:
    ids, calls, dead = clean_history()
    missing = "never-seen-1"
    found = problems(Audit(ids | {missing}, ids | {missing}, calls, dead))
    assert "lost: 1" in found and missing in found


def test_a_message_nobody_published_is_unexpected() -> None:
    ids, calls, dead = clean_history()
    stray = ids_with(0, 3)[2]  # not in the clean history
    found = problems(Audit(ids, ids, calls + handled(stray, 1), dead))
    assert "unexpected: 1" in found and stray in found


def test_one_message_under_two_message_ids_is_reported() -> None:
    ids, calls, dead = clean_history()
    lid = sorted(ids)[0]
    found = problems(Audit(ids, ids, calls + handled(lid, 1, msg_id="another"), dead), bound=10)
    assert "several message ids" in found


def test_a_handler_call_beyond_max_attempts_is_reported() -> None:
    ids, calls, dead = clean_history()
    (poison,) = ids_with(POISON)
    found = problems(Audit(ids, ids, calls + handled(poison, MAX_ATTEMPTS + 1, kind="fail"), dead))
    assert "attempts outside" in found


def test_poison_must_be_dead_lettered_and_never_handled() -> None:
    ids, calls, _dead = clean_history()
    assert "poison messages not dead-lettered" in problems(Audit(ids, ids, calls, []))
    (poison,) = ids_with(POISON)
    found = problems(Audit(ids, ids, calls + handled(poison, 2), []), bound=10)
    assert "poison messages reported as handled" in found


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"x_original_queue": "chaos:other"}, "x_original_queue"),
        ({"x_original_queue": None}, "x_original_queue"),
        ({"x_dead_letter_time": "yesterday"}, "x_dead_letter_time"),
        ({"x_dead_letter_time": "2026-01-02T03:04:05"}, "x_dead_letter_time"),
        ({"x_dead_letter_reason": None}, "x_dead_letter_reason"),
        ({"attempts": 2}, "failure at attempt 2"),
        ({"x_dead_letter_reason": "attempts exhausted: delivered 3 times"}, "exhausted after only 3"),
        ({"x_dead_letter_reason": "why not"}, "unknown reason"),
    ],
)
def test_dead_letter_headers_are_checked(overrides: dict[str, Any], expected: str) -> None:
    ids, calls, _dead = clean_history()
    (poison,) = ids_with(POISON)
    assert expected in problems(Audit(ids, ids, calls, [dead_letter(poison, **overrides)]))


def test_a_message_that_fails_only_early_is_not_dead_lettered_by_a_failure() -> None:
    ids, calls, dead = clean_history()
    (once,) = ids_with(1)
    found = problems(Audit(ids, ids, calls, [*dead, dead_letter(once)]))
    assert "failure at attempt 3 dead-lettered it (plan: 1 failures)" in found


def test_a_call_cut_off_by_a_kill_must_come_back_with_a_higher_attempt() -> None:
    ids, calls, dead = clean_history()
    plain = ids_with(0, 3)[2]  # not in the clean history
    ids = ids | {plain}
    cut = handled(plain, 1, KILLED, kind="")
    assert "never came back with a higher one" in problems(
        Audit(ids, ids, calls + cut + handled(plain, 1), dead), {KILLED}, 10
    )
    assert problems(Audit(ids, ids, calls + cut + handled(plain, 2), dead), {KILLED}) == ""
    assert "not killed" in problems(Audit(ids, ids, calls + cut + handled(plain, 2), dead), set())


def test_a_message_handled_by_a_worker_that_was_not_killed_is_not_handed_out_again() -> None:
    ids, calls, dead = clean_history()
    (plain,) = ids_with(0, 1)
    again = calls + handled(plain, 2, OTHER)
    assert "handled again after a worker that was not killed" in problems(
        Audit(ids, ids, again, dead), bound=10
    )
    # after a kill took the ack with it, that is the expected duplicate
    lost_ack = [c._replace(pid=KILLED) if c.lid == plain else c for c in calls] + handled(plain, 2, OTHER)
    assert problems(Audit(ids, ids, lost_ack, dead), {KILLED}, bound=1) == ""
    assert "exceed the bound 0" in problems(Audit(ids, ids, lost_ack, dead), {KILLED}, bound=0)


def test_two_live_holders_of_one_message_are_reported() -> None:
    ids, calls, dead = clean_history()
    (plain,) = ids_with(0, 1)
    first = [c for c in calls if c.lid == plain]
    inside = (first[0].at + first[1].at) / 2
    overlap = [
        Call("start", inside, f"m-{plain}", plain, 2, OTHER, {}),
        Call("ok", inside + 100, f"m-{plain}", plain, 2, OTHER, {}),
    ]
    assert "overlapped" in problems(Audit(ids, ids, calls + overlap, dead), bound=10)


def test_with_copies_a_second_copy_excuses_only_its_own_message() -> None:
    """Where a kill can leave two copies (AMQP), an id with a call in a killed worker, an
    attempt seen twice or an attempt skipped is not held to the one-copy checks; every
    other id still is."""
    ids, calls, dead = clean_history()
    plain, other = ids_with(0, 2)
    twice = calls + handled(plain, 1, OTHER)  # the same attempt again: a second copy
    assert problems(Audit(ids, ids, twice, dead), bound=1, copies=True) == ""
    assert "handled again" in problems(Audit(ids, ids, twice, dead), bound=1, copies=False)
    again = calls + handled(other, 2, WORKER)
    assert "handled again" in problems(Audit(ids, ids, again, dead), bound=1, copies=True)
    # a gap in the attempts: a killed worker held it unstarted, so a copy may exist
    gap = [*handled(plain, 2), *handled(plain, 3, OTHER)]
    gapped = [c for c in calls if c.lid != plain] + gap
    assert problems(Audit(ids, ids, gapped, dead), bound=1, copies=True) == ""
    assert "handled again" in problems(Audit(ids, ids, gapped, dead), bound=1, copies=False)


def test_a_run_that_exercised_nothing_fails() -> None:
    (plain,) = ids_with(0, 1)
    found = problems(Audit({plain}, {plain}, handled(plain, 1), []))
    assert "exercised too little" in found


def test_records_are_read_from_the_children_files(tmp_path: Path) -> None:
    (plain,) = ids_with(0, 1)
    (tmp_path / "intent-p1.txt").write_text(f"{plain}\nhalf-written")  # no newline: not a line
    (tmp_path / "ledger-p1.txt").write_text(f"{plain}\n")
    (tmp_path / "deliveries-77.txt").write_text(
        f"1.5\tstart\tm-1\t{plain}\t1\n2.5\tok\tm-1\t{plain}\t1\n"
        f'3.5\tdead\tm-2\t{plain}\t1\t{{"attempts": 3}}\n4.5\tstart\tm-1'
    )
    read = Audit.read(tmp_path)
    assert read.intended == {plain} and read.confirmed == {plain}
    assert [(c.kind, c.at, c.pid, c.attempt) for c in read.calls] == [
        ("start", 1.5, 77, 1),
        ("ok", 2.5, 77, 1),
    ]
    assert read.dead[0].headers == {"attempts": 3}
