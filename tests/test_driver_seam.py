"""Adding a driver needs its options module, its driver module and one row in the kind
table — nothing in the loader, the app or the runtime (docs/adding-a-driver.md).

A toy driver (``tests/support/toy/``) is added by one row, here, and then configured,
validated, started and used like the built-in ones.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

import conveyor
from conveyor import errors, queue
from conveyor.drivers import kinds
from tests.support.handlers import install
from tests.support.toy import driver as toy_driver
from tests.support.toy.options import ToyConsumerOptions, ToyOptions, ToyQueueOptions
from tests.support.waiting import wait_until

ROW = kinds.DriverKind("queue.driver.toy", "tests.support.toy.options", "tests.support.toy.driver:ToyDriver")


@pytest.fixture(autouse=True)
def _toy_row(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kinds, "KINDS", (*kinds.KINDS, ROW))


def write(tmp_path: Path, entries: str) -> Path:
    path = tmp_path / "app.yaml"
    path.write_text("version: '1.0'\nnamespace: toyapp\nentries:\n" + textwrap.dedent(entries))
    return path


def test_its_fields_are_validated_like_any_drivers(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        - {name: a, kind: queue.driver.toy, lable: x}
        - {name: b, kind: queue.driver.toy, label: y, chunk: 0}
        - {name: q, kind: queue.queue, driver: b, driver_options: {toy: {max_length: 13}}}
        - {name: w, kind: queue.consumer, queue: q, handler: "x:y", driver_options: {toy: {tags: t}}}
        """,
    )
    with pytest.raises(errors.Error) as info:
        conveyor.load(path)
    found = {(p["entry"], p["field"]): p["message"] for p in info.value.details["problems"]}
    assert found == {
        ("toyapp:a", "label"): "required field is missing",
        ("toyapp:a", "lable"): "unknown field (did you mean 'label'?)",
        ("toyapp:b", "chunk"): "must be between 1 and 100, got 0",
        ("toyapp:q", "driver_options.toy.max_length"): "13 is unlucky",
        ("toyapp:w", "driver_options.toy.tags"): "unknown field (did you mean 'tag'?)",
    }


def test_it_loads_starts_and_carries_messages(tmp_path: Path) -> None:
    seen: list[Any] = []
    path = write(
        tmp_path,
        f"""
        - {{name: drv, kind: queue.driver.toy, label: hello}}
        - {{name: q, kind: queue.queue, driver: drv, driver_options: {{toy: {{max_length: 1}}}}}}
        - name: w
          kind: queue.consumer
          queue: q
          handler: "{install(seen.append)}"
          driver_options: {{toy: {{tag: t1}}}}
          lifecycle: {{auto_start: false}}
        """,
    )
    app = conveyor.load(path)
    registry = app.registry
    assert registry.drivers["toyapp:drv"].options == ToyOptions(label="hello", chunk=10)
    assert registry.queues["toyapp:q"].driver_options == {"toy": ToyQueueOptions(max_length=1)}
    assert registry.consumers["toyapp:w"].driver_options == {"toy": ToyConsumerOptions(tag="t1")}
    with app:
        assert queue.publish("toyapp:q", {"n": 1})
        with pytest.raises(errors.Error) as full:
            queue.publish("toyapp:q", {"n": 2})
        assert full.value.details["reason"] == "queue_full"
        assert queue.info("toyapp:q")["label"] == "hello"
        app.start_consumers(["toyapp:w"])
        wait_until(lambda: seen == [{"n": 1}])
    assert toy_driver.INSTANCES[-1].tags == ["t1"]
