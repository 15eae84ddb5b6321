"""``conveyor run --processes N``: one supervisor, N worker processes, a SQLite app.

Everything that runs is a real subprocess (``python -m conveyor run ... --processes 2``)
in ``tmp_path``; the test process publishes and reads the queue through the same file.
The supervisor's stdout and stderr go to files: its workers inherit them, and a pipe
would keep the test waiting for the workers too.

Faults F01 and S03 (a worker killed mid-run is restarted), F05 (SIGTERM drains the
handlers in flight, exit 0), F06 (a handler that never returns: a second SIGTERM ends
the run at once, the message goes back to its queue).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import conveyor
from conveyor import queue
from conveyor.cli.commands import _worker_args
from conveyor.cli.parser import build_parser
from conveyor.prefork import Backoff, Prefork, PreforkResult, WorkerRun, _Slot, combine_reports, next_step
from tests.support.waiting import wait_until

STARTUP = 30.0  # seconds to wait for something that needs interpreters to start (a busy machine)

APP = """\
version: "1.0"
namespace: t
entries:
  - name: store
    kind: queue.driver.sqlite
    path: queue.db
    poll_interval: 20ms
  - {name: jobs, kind: queue.queue, driver: store, retry: {delay: 0}}
  - name: worker
    kind: queue.consumer
    queue: t:jobs
    handler: "prefork_handlers:handle"
    prefetch: 1
  - name: ready
    kind: function.python
    source: "prefork_handlers:ready"
    lifecycle: {on_start: true}
"""

MEMORY_APP = """\
version: "1.0"
namespace: t
entries:
  - {name: mem, kind: queue.driver.memory}
  - {name: jobs, kind: queue.queue, driver: mem}
  - {name: worker, kind: queue.consumer, queue: t:jobs, handler: "prefork_handlers:handle"}
  - name: ready
    kind: function.python
    source: "prefork_handlers:ready"
    lifecycle: {on_start: true}
"""

# The handlers. Every worker appends its PID to started.txt once it runs (on_start), and
# a handler waits until $PREFORK_TEST_WORKERS workers have: no worker can take all the
# work before the others exist. With prefetch 1, each worker then holds one message at
# a time.
HANDLERS = """\
import os
import pathlib
import time

from conveyor import queue

HERE = pathlib.Path(__file__).parent
WORKERS = int(os.environ.get("PREFORK_TEST_WORKERS", "1"))


def _append(name, line):
    with open(HERE / name, "a", encoding="utf-8") as f:
        f.write(line + "\\n")


def _lines(name):
    try:
        return (HERE / name).read_text(encoding="utf-8").split()
    except FileNotFoundError:
        return []


def ready():
    _append("starting.txt", str(os.getpid()))
    if (HERE / "fail-at-start").exists():
        raise RuntimeError("this worker cannot start")
    if (HERE / "hang-at-start").exists():  # the first worker here never finishes starting
        try:
            fd = os.open(HERE / "hung.txt", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pass
        else:
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            time.sleep(1000)
    _append("started.txt", str(os.getpid()))


def handle(payload):
    deadline = time.monotonic() + 60
    while len(set(_lines("started.txt"))) < WORKERS:
        if time.monotonic() > deadline:
            raise RuntimeError("the other workers never started")
        time.sleep(0.02)
    if payload.get("share"):  # a barrier: no worker goes on before every worker holds a message
        _append("sharing.txt", str(os.getpid()))
        while len(set(_lines("sharing.txt"))) < WORKERS:
            if time.monotonic() > deadline:
                raise RuntimeError("the other workers never took a message")
            time.sleep(0.02)
    attempt = queue.message().attempts
    if payload.get("seconds") and attempt <= payload.get("slow_attempts", 1000):
        _append("begun.txt", f"{payload['n']}:{os.getpid()}")
        time.sleep(payload["seconds"])
    _append("handled.txt", f"{payload['n']}:{os.getpid()}:{attempt}")
"""


# --------------------------------------------------------------------------- helpers


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie nobody has reaped yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def write_app(directory: Path, text: str = APP) -> Path:
    (directory / "prefork_handlers.py").write_text(HANDLERS)
    path = directory / "app.yaml"
    path.write_text(text)
    return path


def publish(config: Path, payloads: list[dict[str, Any]]) -> None:
    with conveyor.load(config):
        queue.publish_many("t:jobs", payloads)


def queue_info(config: Path) -> dict[str, Any]:
    with conveyor.load(config):
        return queue.info("t:jobs")


class Supervisor:
    """``conveyor run app.yaml --processes N ...`` in ``directory``, output to files."""

    def __init__(self, directory: Path, *args: str, processes: int = 2) -> None:
        self.directory = directory
        self.stdout_path = directory / "stdout.txt"
        self.stderr_path = directory / "stderr.txt"
        env = {k: v for k, v in os.environ.items() if k != "CONVEYOR_CONFIG"}
        env["PREFORK_TEST_WORKERS"] = str(processes)
        command = [sys.executable, "-m", "conveyor", "run", "app.yaml", "--processes", str(processes)]
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(
                [*command, *args],
                cwd=directory,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # its own process group, as a shell gives a command
            )

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def workers(self) -> list[int]:
        """PIDs of the workers that have started, in order (restarted ones too)."""
        return [int(pid) for pid in lines(self.directory / "started.txt")]

    def wait_for_workers(self, count: int) -> list[int]:
        def started() -> bool:
            assert self.proc.poll() is None, f"exited early ({self.proc.returncode}):\n{self.stderr}"
            return len(self.workers()) >= count

        wait_until(started, timeout=STARTUP)
        return self.workers()

    def finish(self, timeout: float = STARTUP) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the supervisor did not exit within {timeout}s:\n{self.stderr}")

    def kill_everything(self) -> None:
        starting = [int(pid) for pid in lines(self.directory / "starting.txt")]
        for pid in [self.proc.pid, *starting]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def run_supervisor(tmp_path: Path) -> Iterator[Any]:
    started: list[Supervisor] = []

    def start(*args: str, processes: int = 2) -> Supervisor:
        supervisor = Supervisor(tmp_path, *args, processes=processes)
        started.append(supervisor)
        return supervisor

    yield start
    for supervisor in started:  # whatever happened, leave no process behind
        supervisor.kill_everything()


# --------------------------------------------------------------------------- with processes


def test_workers_share_the_work(tmp_path: Path, run_supervisor: Any) -> None:
    """Both workers handle messages. Each message waits until every worker holds one
    (prefetch 1), so one worker cannot take them all before the other polls (regression:
    under load the first worker handled all 12 within the other's 20 ms poll interval)."""
    config = write_app(tmp_path)
    publish(config, [{"n": n, "share": True} for n in range(12)])
    supervisor = run_supervisor("--until-idle", "--json")
    assert supervisor.finish() == 0, supervisor.stderr
    handled = [line.split(":") for line in lines(tmp_path / "handled.txt")]
    assert sorted(int(n) for n, _, _ in handled) == list(range(12))  # each message once
    pids = {int(pid) for _, pid, _ in handled}
    assert len(pids) == 2, handled
    assert pids == set(supervisor.workers())
    assert supervisor.proc.pid not in pids
    report = json.loads(supervisor.stdout)
    assert report["ok"] is True
    assert report["reason"] == "idle"
    assert report["processes"] == 2
    assert report["restarts"] == 0
    assert report["consumers"]["t:worker"]["acked"] == 12  # summed over the workers
    assert report["queues"]["t:jobs"]["message_count"] == 0
    assert sorted(w["pid"] for w in report["workers"]) == sorted(pids)
    assert all(w["exit_code"] == 0 and w["reason"] == "idle" for w in report["workers"])
    assert "[worker=1]" in supervisor.stderr and "[worker=2]" in supervisor.stderr  # tagged log lines


def test_a_killed_worker_is_restarted(tmp_path: Path, run_supervisor: Any) -> None:
    """The killed worker held a message: it comes back (attempt 2) and is handled once."""
    config = write_app(tmp_path)
    publish(config, [{"n": 1, "seconds": 1000, "slow_attempts": 1}])  # hangs on its first attempt
    supervisor = run_supervisor("--json")
    wait_until(lambda: len(lines(tmp_path / "begun.txt")) == 1, timeout=STARTUP)
    victim = int(lines(tmp_path / "begun.txt")[0].split(":")[1])
    first, second = supervisor.wait_for_workers(2)
    survivor = second if victim == first else first
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(lines(tmp_path / "handled.txt")) == 1, timeout=STARTUP)
    replacement = supervisor.wait_for_workers(3)[2]
    assert replacement not in (first, second)
    assert alive(replacement)
    n, pid, attempt = lines(tmp_path / "handled.txt")[0].split(":")
    assert (n, attempt) == ("1", "2")
    assert int(pid) in (survivor, replacement)
    supervisor.proc.send_signal(signal.SIGTERM)
    assert supervisor.finish() == 0, supervisor.stderr
    assert not alive(survivor) and not alive(replacement)
    pattern = rf"worker (\d) \(pid {victim}\) was killed by SIGKILL after [\d.]+s; restarting it in 0.5s"
    assert re.search(pattern, supervisor.stderr), supervisor.stderr
    report = json.loads(supervisor.stdout)
    assert report["restarts"] == 1
    assert report["reason"] == "signal"
    runs = {w["pid"]: w for w in report["workers"]}
    assert runs[victim]["signal"] == "SIGKILL" and runs[victim]["reported"] is False
    assert runs[survivor]["exit_code"] == 0 and runs[replacement]["exit_code"] == 0
    assert report["consumers"]["t:worker"]["acked"] == 1  # the victim's counters died with it
    assert queue_info(config)["message_count"] == 0


def test_a_worker_that_keeps_failing_is_restarted_ever_more_slowly(
    tmp_path: Path, run_supervisor: Any
) -> None:
    write_app(tmp_path)
    (tmp_path / "fail-at-start").touch()  # on_start raises: every worker exits 1 as it starts
    supervisor = run_supervisor(processes=2)
    delays = re.compile(r"worker 1 \(pid \d+\) exited with code 1 after [\d.]+s; restarting it in ([\d.]+)s")
    wait_until(lambda: len(delays.findall(supervisor.stderr)) >= 2, timeout=STARTUP)
    supervisor.proc.send_signal(signal.SIGTERM)  # during a backoff wait, or while a worker starts
    assert supervisor.finish() in (0, 1), supervisor.stderr
    assert delays.findall(supervisor.stderr)[:2] == ["0.5", "1"]


def test_until_idle_with_a_timeout(tmp_path: Path, run_supervisor: Any) -> None:
    config = write_app(tmp_path)
    publish(config, [{"n": 1, "seconds": 1000}])
    supervisor = run_supervisor("--until-idle", "--timeout", "1", "--grace", "0.2", "--json")
    assert supervisor.finish() == 1, supervisor.stderr
    assert supervisor.stderr.splitlines()[-1] == "conveyor: TIMEOUT: not idle after 1s (--timeout)"
    report = json.loads(supervisor.stdout)
    assert (report["ok"], report["reason"], report["restarts"]) == (False, "timeout", 0)
    assert {w["reason"] for w in report["workers"]} == {"timeout"}  # neither restarted
    assert queue_info(config)["message_count"] == 1  # the hung message went back


def test_sigterm_drains_the_handlers_in_flight(tmp_path: Path, run_supervisor: Any) -> None:
    config = write_app(tmp_path)
    publish(config, [{"n": 1, "seconds": 1.5}, {"n": 2, "seconds": 1.5}])
    supervisor = run_supervisor()
    wait_until(lambda: len(lines(tmp_path / "begun.txt")) == 2, timeout=STARTUP)
    supervisor.proc.send_signal(signal.SIGTERM)
    assert supervisor.finish() == 0, supervisor.stderr
    handled = lines(tmp_path / "handled.txt")
    assert sorted(line.split(":")[0] for line in handled) == ["1", "2"]
    assert len({line.split(":")[1] for line in handled}) == 2  # one message in each worker
    assert not any(alive(pid) for pid in supervisor.workers())  # it exited after its workers
    # The shutdown order of the module docstring: the supervisor forwards the signal; each
    # worker stops its consumers (the handler in flight finishes) and exits; then the
    # supervisor records it.
    err = supervisor.stderr
    forwarded = err.index("received SIGTERM: stopping 2 worker(s) gracefully")
    for slot in (1, 2):
        received = err.index(
            f"received SIGTERM: stopping gracefully (send it again to stop at once) [worker={slot}]"
        )
        consumer = re.search(rf"consumer t:worker stopped .*'acked': 1.*worker={slot}\]", err)
        assert consumer, err
        exited = re.search(rf"conveyor.prefork: worker {slot} \(pid \d+\) stopped", err)
        assert exited, err
        assert forwarded < received < consumer.start() < exited.start()
    assert err.count("received SIGTERM: stopping gracefully") == 2  # each worker once
    assert "stopping at once" not in supervisor.stderr
    assert "stopping the workers at once" not in supervisor.stderr
    first_line = supervisor.stdout.splitlines()[0]
    assert first_line.startswith("stopped by a signal after") and "(forced)" not in first_line
    assert (
        "2 worker processes, 0 restarts; consumer counts summed over 2 of 2 worker runs" in supervisor.stdout
    )
    assert queue_info(config)["message_count"] == 0


def test_ctrl_c_in_a_terminal_stops_gracefully(tmp_path: Path, run_supervisor: Any) -> None:
    """A terminal sends SIGINT to the whole foreground process group: the workers must get
    it once (from the supervisor), or they would take the second copy as "stop at once"."""
    config = write_app(tmp_path)
    publish(config, [{"n": 1, "seconds": 1.0}])
    supervisor = run_supervisor()
    wait_until(lambda: len(lines(tmp_path / "begun.txt")) == 1, timeout=STARTUP)
    workers = supervisor.wait_for_workers(2)
    assert [os.getpgid(pid) for pid in workers] == workers  # each leads a group of its own
    os.killpg(supervisor.proc.pid, signal.SIGINT)
    assert supervisor.finish() == 0, supervisor.stderr
    assert supervisor.stderr.count("received SIGINT: stopping gracefully") == 2
    assert "at once" not in supervisor.stderr.replace("(send it again to stop at once)", "")
    assert [line.split(":")[0] for line in lines(tmp_path / "handled.txt")] == ["1"]
    assert queue_info(config)["message_count"] == 0


def test_a_second_sigterm_stops_at_once(tmp_path: Path, run_supervisor: Any) -> None:
    """One worker runs a handler stuck in ``time.sleep(1000)``; the other is frozen (SIGSTOP),
    so only SIGKILL can end it. The second SIGTERM is forwarded: the first worker stops at
    once by itself; the frozen one is killed after the bound."""
    config = write_app(tmp_path)
    publish(config, [{"n": 1, "seconds": 1000}])
    supervisor = run_supervisor()  # grace: the default 30 s
    wait_until(lambda: len(lines(tmp_path / "begun.txt")) == 1, timeout=STARTUP)
    busy = int(lines(tmp_path / "begun.txt")[0].split(":")[1])
    (frozen,) = [pid for pid in supervisor.workers() if pid != busy]
    os.kill(frozen, signal.SIGSTOP)
    supervisor.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "received SIGTERM: stopping gracefully" in supervisor.stderr, timeout=STARTUP)
    assert supervisor.proc.poll() is None  # waiting for the handler's grace period
    supervisor.proc.send_signal(signal.SIGTERM)
    code = supervisor.finish(timeout=15)  # well under the 30 s grace
    assert code == 1, supervisor.stderr
    err = supervisor.stderr
    assert "received SIGTERM: stopping the workers at once" in err
    assert re.search(r"conveyor.app: received SIGTERM: stopping at once \[worker=\d\]", err)  # forwarded
    assert f"(pid {busy}) still running" not in err  # it stopped by itself
    assert f"(pid {frozen}) still running 5s after the forced stop: killing it (SIGKILL)" in err
    assert "(forced)" in supervisor.stdout.splitlines()[0]
    assert err.splitlines()[-1] == "conveyor: the stop was forced; 1 worker killed (SIGKILL)"
    assert not alive(busy) and not alive(frozen)
    info = queue_info(config)  # the message came back, unsettled
    assert (info["message_count"], info["in_flight"]) == (1, 0)
    assert not (tmp_path / "handled.txt").exists()


def test_no_orphans_when_the_supervisor_is_killed(tmp_path: Path, run_supervisor: Any) -> None:
    """One worker is stuck in its on_start function, so a first SIGTERM cannot end it:
    after the supervisor's death it escalates by itself, as the supervisor would have."""
    write_app(tmp_path)
    (tmp_path / "hang-at-start").touch()
    supervisor = run_supervisor("--grace", "0.5")
    started = supervisor.wait_for_workers(1)
    wait_until(lambda: bool(lines(tmp_path / "hung.txt")), timeout=STARTUP)  # holds its PID
    stuck = int(lines(tmp_path / "hung.txt")[0])
    workers = [*started, stuck]
    supervisor.proc.kill()
    supervisor.proc.wait()
    wait_until(lambda: not any(alive(pid) for pid in workers), timeout=STARTUP)
    err = supervisor.stderr
    assert err.count("the supervisor is gone: stopping this worker (as on SIGTERM)") == 2
    assert "still running 5.5s after its supervisor died: stopping at once" in err  # only the stuck one
    assert err.count("still running 5.5s after its supervisor died") == 1


def test_a_configuration_error_in_the_workers_is_not_restarted(tmp_path: Path, run_supervisor: Any) -> None:
    write_app(tmp_path, APP.replace("prefork_handlers:handle", "absent_module:handle"))
    supervisor = run_supervisor()
    assert supervisor.finish() == 2, supervisor.stderr
    assert "cannot import module 'absent_module'" in supervisor.stderr
    assert "a restart would fail the same way" in supervisor.stderr
    assert "restarting" not in supervisor.stderr
    assert supervisor.stdout.startswith("stopped (a worker failed) after")


def test_the_memory_driver_is_refused_before_anything_starts(tmp_path: Path, run_supervisor: Any) -> None:
    write_app(tmp_path, MEMORY_APP)
    supervisor = run_supervisor("--until-idle")
    assert supervisor.finish() == 2
    assert supervisor.stderr.splitlines() == [
        "conveyor: INVALID: --processes 2: the workers cannot share the work: driver t:mem "
        "(queue.driver.memory) keeps t:jobs inside one process; use a driver whose queues several "
        "processes share (such as queue.driver.sqlite)"
    ]
    assert supervisor.stdout == ""
    assert not (tmp_path / "started.txt").exists()  # no worker ran


# --------------------------------------------------------------------------- the parts


def test_workers_get_the_same_flags_minus_processes() -> None:
    parser = build_parser()
    given = ["run", "app.yaml", "--processes", "3", "--until-idle", "--idle-settle", "0.25"]
    args = parser.parse_args([*given, "--grace", "1.5", "--log-bodies", "--log-level", "debug", "--json"])
    worker = parser.parse_args(["run", *_worker_args(args, "/abs/app.yaml"), "--prefork-worker", "2:7"])
    assert worker.path == "/abs/app.yaml"
    assert (worker.until_idle, worker.idle_settle, worker.grace) == (True, 0.25, 1.5)
    assert (worker.log_bodies, worker.log_level) == (True, "DEBUG")
    assert (worker.processes, worker.json, worker.timeout) == (1, False, None)
    assert worker.prefork_worker == (2, 7)


@pytest.mark.parametrize("value", ["0", "257", "two"])
def test_processes_out_of_range_is_a_usage_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["run", "--processes", value])
    assert exc.value.code == 2
    assert "--processes" in capsys.readouterr().err


def test_backoff_doubles_up_to_its_cap_and_resets_after_a_healthy_run() -> None:
    backoff = Backoff(initial=0.5, factor=2.0, cap=5.0, healthy=60.0)
    assert [backoff.delay(n) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert backoff.after(1.0, 0) == (0.5, 1)
    assert backoff.after(1.0, 3) == (4.0, 4)  # quick failures: slower each time
    assert backoff.after(59.9, 9) == (5.0, 10)
    assert backoff.after(60.0, 9) == (0.5, 1)  # it ran healthy for a while: start over


def test_a_restarted_worker_gets_what_is_left_of_the_timeout() -> None:
    prefork = Prefork(["/abs/app.yaml", "--until-idle"], 2, timeout=5.0)
    command = prefork._command(_Slot(2), 7, 3.25)
    assert command[:4] == [sys.executable, "-m", "conveyor", "run"]
    assert command[4:] == ["/abs/app.yaml", "--until-idle", "--timeout", "3.250", "--prefork-worker", "2:7"]
    assert "--timeout" not in Prefork(["/abs/app.yaml"], 2)._command(_Slot(1), 7, None)


def run_of(code: int | None, reason: str | None = None, *, during_stop: bool = False) -> WorkerRun:
    report = None if reason is None else {"reason": reason, "consumers": {}, "queues": {}}
    return WorkerRun(1, 100, code, 1.0, report, during_stop)


@pytest.mark.parametrize(
    ("run", "stopping", "step"),
    [
        (run_of(-9), False, "restart"),  # killed
        (run_of(1), False, "restart"),  # a runtime failure (a broker down, ...)
        (run_of(0, "signal"), False, "restart"),  # someone else stopped it
        (run_of(2), False, "fatal"),  # a configuration error: a restart repeats it
        (run_of(0, "idle"), False, "finished"),  # --until-idle
        (run_of(1, "timeout"), False, "finished"),  # --timeout
        (run_of(-9), True, "stopped"),  # anything, once stopping
    ],
)
def test_what_follows_a_worker_run(run: WorkerRun, stopping: bool, step: str) -> None:
    assert next_step(run, stopping=stopping, fatal_codes={2}) == step


def test_reports_are_summed_and_the_last_queue_reading_wins() -> None:
    reports = [
        {"consumers": {"t:w": {"delivered": 3, "acked": 2}}, "queues": {"t:jobs": {"message_count": 5}}},
        {"consumers": {"t:w": {"delivered": 4, "acked": 4}, "t:v": {"acked": 1}}, "queues": {"t:jobs": {}}},
        {"consumers": {"t:w": {"delivered": 1, "acked": 0}}, "queues": {"t:jobs": {"message_count": 0}}},
    ]
    consumers, queues = combine_reports(reports)
    assert consumers == {"t:w": {"delivered": 8, "acked": 6}, "t:v": {"acked": 1}}
    assert queues == {"t:jobs": {"message_count": 0}}
    assert combine_reports([]) == ({}, {})


def test_how_a_prefork_run_ended() -> None:
    result = PreforkResult(2, runs=[run_of(0, "idle"), run_of(0, "idle")])
    assert (result.reason, result.restarts, len(result.reports), result.unclean) == ("idle", 0, 2, [])
    result.runs.append(run_of(1, "timeout"))
    assert (result.reason, result.restarts) == ("timeout", 1)
    stopped = PreforkResult(
        2, signalled=True, runs=[run_of(-15, during_stop=True), run_of(1, during_stop=True)]
    )
    assert stopped.reason == "signal"
    assert stopped.unclean == [stopped.runs[1]]  # killed by the stop's own signal before its handlers: clean
