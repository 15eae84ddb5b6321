"""Fuzzing the YAML loader: any file is either a Registry or one INVALID error listing
its problems, within a time bound. Random text, random documents, and valid app files
mutated at random (values replaced, keys dropped or added, text spliced)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from conveyor import errors
from conveyor.registry.loader import load_registry
from conveyor.registry.model import Registry
from tests.fuzz import FUZZ

BOUND = 2.0  # seconds for one load; milliseconds in practice

VALID = {
    "version": "1.0",
    "namespace": "app",
    "security": {"strict": False},
    "entries": [
        {"name": "mem", "kind": "queue.driver.memory", "max_message_size": "1MiB"},
        {"name": "db", "kind": "queue.driver.sqlite", "path": "q.db", "busy_timeout": "2s"},
        {
            "name": "orders",
            "kind": "queue.queue",
            "driver": "mem",
            "codec": "json/plain",
            "dead_letter": {"queue": "orders_dlq", "max_attempts": 3},
            "retry": {"delay": "1s", "backoff": 2, "max_delay": "1m"},
            "driver_options": {"memory": {"max_length": 10}},
        },
        {"name": "orders_dlq", "kind": "queue.queue", "driver": "mem"},
        {
            "name": "orders_v1",
            "kind": "queue.queue",
            "driver": "mem",
            "queue_name": "orders",
            "alias_of": "orders",
        },
        {
            "name": "worker",
            "kind": "queue.consumer",
            "queue": "orders",
            "handler": "os.path:join",
            "concurrency": 2,
            "prefetch": 4,
            "security": {"actor": {"id": "bot", "meta": {"team": "ops"}}, "groups": ["pub"]},
        },
        {"name": "fn", "kind": "function.python", "source": "os.path:join"},
        {
            "name": "pub",
            "kind": "security.policy",
            "groups": ["pub"],
            "policy": {
                "actions": ["queue.publish", "queue.publish.queue"],
                "resources": ["app:*"],
                "effect": "allow",
                "conditions": [{"field": "actor.meta.team", "operator": "in", "value": ["ops"]}],
            },
        },
    ],
}
VALID_TEXT = yaml.safe_dump(VALID, sort_keys=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("yaml-fuzz")


def load_within_bound(folder: Path, text: str) -> Registry | errors.Error:
    path = folder / "app.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    started = time.perf_counter()
    try:
        result: Registry | errors.Error = load_registry(path)
    except errors.Error as exc:
        assert exc.kind == errors.INVALID, exc
        problems = exc.details["problems"]
        assert problems and all(set(p) == {"file", "entry", "field", "message", "line"} for p in problems)
        assert all(isinstance(p["message"], str) and p["message"] for p in problems)
        result = exc
    assert time.perf_counter() - started < BOUND
    return result


def test_the_valid_file_loads(folder: Path) -> None:
    assert isinstance(load_within_bound(folder, VALID_TEXT), Registry)


YAML_BITS = [
    ": ",
    "- ",
    "\n",
    "\n  ",
    "  ",
    "[",
    "]",
    "{",
    "}",
    ",",
    "&a ",
    "*a",
    "&b ",
    "*b",
    "<<: ",
    "!!int ",
    "!!str ",
    "!!binary ",
    "!!set ",
    "!!timestamp ",
    "!!python/object:os.system ",
    "? ",
    "|\n",
    ">\n",
    "'",
    '"',
    "#",
    "${HOME}",
    "${NOPE}",
    "$${",
    "${",
    "~",
    "null",
    "true",
    "1e400",
    "0x",
    "2001-02-30",
    "---\n",
    "...\n",
    "%YAML 1.1\n",
    "\t",
    "\ufeff",
    "\x00",
    "\\",
    "entries",
    "kind",
    "queue.queue",
    "alias_of",
    "namespace",
]
yaml_text = st.lists(st.one_of(st.sampled_from(YAML_BITS), st.text(max_size=6)), max_size=40).map("".join)


@FUZZ
@given(text=yaml_text)
def test_random_text(folder: Path, text: str) -> None:
    load_within_bound(folder, text)


@FUZZ
@given(position=st.integers(0, len(VALID_TEXT)), cut=st.integers(0, 20), insert=yaml_text)
def test_valid_text_spliced(folder: Path, position: int, cut: int, insert: str) -> None:
    load_within_bound(folder, VALID_TEXT[:position] + insert + VALID_TEXT[position + cut :])


values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),
        st.text(max_size=10),
        st.sampled_from(
            ["mem", "orders", "app:orders", "1s", "-1s", "16MiB", "json/plain", "queue.queue", "*"]
        ),
        st.binary(max_size=4),
        st.dates(),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path to a value inside ``node``."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*prefix, key)
            yield from paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield (*prefix, index)
            yield from paths(value, (*prefix, index))


ALL_PATHS = list(paths(VALID))


def mutate(document: Any, path: tuple[Any, ...], action: str, value: Any, key: str) -> Any:
    parent = document
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if action == "replace":
        parent[last] = value
    elif action == "drop":
        del parent[last]
    elif isinstance(parent[last], dict):
        parent[last][key] = value
    else:
        parent[last] = [parent[last], value]
    return document


@FUZZ
@given(
    changes=st.lists(
        st.tuples(
            st.sampled_from(ALL_PATHS),
            st.sampled_from(["replace", "drop", "add"]),
            values,
            st.sampled_from(["name", "kind", "alias_of", "queue_name", "dead_letter", "extra", "<<", "id"]),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_valid_document_mutated(folder: Path, changes: list[tuple[Any, ...]]) -> None:
    document = yaml.safe_load(VALID_TEXT)
    for path, action, value, key in changes:
        try:
            document = mutate(document, path, action, value, key)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier change removed or reshaped this path
    load_within_bound(folder, yaml.safe_dump(document, sort_keys=False, allow_unicode=True))


@FUZZ
@given(document=values)
def test_random_document(folder: Path, document: Any) -> None:
    load_within_bound(folder, yaml.safe_dump(document, allow_unicode=True))


@FUZZ
@given(
    levels=st.integers(1, 12),
    fan=st.integers(1, 12),
    where=st.sampled_from(["top", "meta", "merge"]),
)
def test_alias_expansions(folder: Path, levels: int, fan: int, where: str) -> None:
    """Anchors that repeat each other: loaded when small, refused when large, always fast."""
    indent = "      " if where == "meta" else ""
    lines = [f"{indent}l0: &l0 [x, y]"]
    for level in range(1, levels + 1):
        refs = ", ".join([f"*l{level - 1}"] * fan)
        if where == "merge":
            lines.append(
                f"{indent}l{level}: &l{level} {{<<: [{refs}] , k{level}: 1}}".replace("[x, y]", "{x: 1}")
            )
        else:
            lines.append(f"{indent}l{level}: &l{level} [{refs}]")
    if where == "merge":
        lines[0] = "l0: &l0 {x: 1}"
    body = "\n".join(lines) + "\n"
    if where == "meta":
        text = f"namespace: app\nentries:\n  - name: m\n    kind: queue.driver.memory\n    meta:\n{body}"
    else:
        text = f"namespace: app\nentries: []\n{body}"
    load_within_bound(folder, text)
