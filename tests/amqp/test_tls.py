"""TLS end to end: the AMQP driver against a private RabbitMQ node with a TLS listener.

A throwaway PKI is made with the ``openssl`` command for the session (a CA, a server
certificate for localhost / 127.0.0.1, client certificates, and an unrelated CA), and
one private node (tests/support/rabbit_node.py) is started for the module with an
``amqps`` listener on a free loopback port, ``verify_peer`` (client certificates are
checked when sent, not required) and the ``rabbitmq_auth_mechanism_ssl`` plugin
(EXTERNAL: the user is the client certificate's common name). The shared broker on
5672 is never used or touched here. Every test asserts payloads that really made the
round trip, or an error raised within the connection timeout.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conveyor import errors, queue
from conveyor.drivers.amqp import AmqpDriver
from tests.amqp.helpers import Sink, on
from tests.conftest import require_private_rabbit, unavailable
from tests.support.harness import Harness
from tests.support.rabbit_node import RabbitNode, TlsListener
from tests.support.waiting import wait_until

# 240 s: the first test also waits for the PKI, the node and its rabbitmqctl calls (about 10 s
# when the machine is quiet, minutes when its CPUs are saturated)
pytestmark = [pytest.mark.broker, pytest.mark.timeout(240)]
CTL_TIMEOUT = 120.0  # each rabbitmqctl call boots an Erlang VM: slow on a loaded machine

USER = "conveyor-tls-client"  # exists on the node, no password: it can only log in by certificate
STRANGER = "conveyor-tls-stranger"  # a valid certificate, but no such user on the node
TIMEOUT = {"connection_timeout": "5s"}  # every failure below must come sooner


# -- a throwaway PKI ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    base: Path

    def path(self, name: str) -> Path:
        return self.base / name

    def pem(self, name: str) -> str:
        return self.path(name).read_text()


def _openssl(base: Path, *args: str) -> None:
    openssl = shutil.which("openssl") or "/usr/bin/openssl"
    try:
        subprocess.run([openssl, *args], cwd=base, check=True, capture_output=True, timeout=30)
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"openssl {' '.join(args[:2])} failed: {exc.stderr.decode(errors='replace')}")


def _ca(base: Path, name: str, subject: str) -> None:
    _openssl(
        base,
        *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", subject),
        *("-keyout", f"{name}.key", "-out", f"{name}.pem"),
        *("-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"),
    )


def _leaf(base: Path, name: str, cn: str, serial: int, extensions: list[str], *, ca: str = "ca") -> None:
    """A key and a certificate for ``cn`` signed by the CA ``ca``."""
    ext = base / f"{name}.ext"
    ext.write_text(
        "\n".join(
            ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment", *extensions]
        )
        + "\n"
    )
    _openssl(
        base,
        *("req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}"),
        *("-keyout", f"{name}.key", "-out", f"{name}.csr"),
    )
    _openssl(
        base,
        *("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key"),
        *("-set_serial", str(serial), "-days", "2", "-extfile", ext.name, "-out", f"{name}.pem"),
    )


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """ca, server (localhost / 127.0.0.1), client (CN=USER), stranger (CN=STRANGER), other_ca,
    and rogue (CN=USER, but signed by other_ca)."""
    if shutil.which("openssl") is None and not Path("/usr/bin/openssl").exists():
        unavailable("the openssl command is not installed")
    base = tmp_path_factory.mktemp("pki")
    _ca(base, "ca", "/CN=conveyor test CA")
    _ca(base, "other_ca", "/CN=conveyor unrelated CA")
    _leaf(
        base,
        "server",
        "localhost",
        2,
        ["extendedKeyUsage=serverAuth", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
    )
    _leaf(base, "client", USER, 3, ["extendedKeyUsage=clientAuth"])
    _leaf(base, "stranger", STRANGER, 4, ["extendedKeyUsage=clientAuth"])
    _leaf(base, "rogue", USER, 5, ["extendedKeyUsage=clientAuth"], ca="other_ca")
    return Pki(base)


# -- the node -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_node(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    require_private_rabbit()
    node = RabbitNode(
        tmp_path_factory.mktemp("rabbit-tls"),
        "conveyor-tls",
        tls=TlsListener(pki.path("ca.pem"), pki.path("server.pem"), pki.path("server.key")),
        plugins=["rabbitmq_auth_mechanism_ssl"],
        config=[
            "auth_mechanisms.1 = PLAIN",
            "auth_mechanisms.2 = EXTERNAL",
            "ssl_cert_login_from = common_name",
        ],
    )
    try:
        node.start(timeout=120)
        node.ctl("add_user", USER, "throwaway-password", timeout=CTL_TIMEOUT)
        node.ctl("clear_password", USER, timeout=CTL_TIMEOUT)
        node.ctl("set_permissions", "-p", "/", USER, ".*", ".*", ".*", timeout=CTL_TIMEOUT)
        yield node
    finally:
        node.stop(timeout=20)
        node.kill()


def amqps(node: RabbitNode, credentials: str = "guest:guest@") -> str:
    return f"amqps://{credentials}127.0.0.1:{node.tls_port}/"


@pytest.fixture
def app_on(tmp_path: Path) -> Harness:
    """A harness whose driver entry each test points at the TLS node (no queue on 5672)."""
    return Harness(tmp_path)


def round_trip(harness: Harness, *payloads: Any) -> list[Any]:
    """Publish ``payloads`` and consume them with a consumer of the app; what the handler saw."""
    sink = Sink()
    q = harness.queue("tls")
    harness.consumer("worker", "tls", sink.record)
    with harness.load() as app:
        for payload in payloads:
            queue.publish(q, payload)
        app.start_consumers()
        wait_until(lambda: len(sink) >= len(payloads), timeout=15)
        time.sleep(0.1)  # nothing more than was published may arrive
    return sink.items


def start_fails(harness: Harness, within: float = 5.0) -> errors.Error:
    """The error ``app.start()`` raises, within ``within`` s (default: the connection_timeout)."""
    harness.queue("never")
    app = harness.load()
    t0 = time.monotonic()
    with pytest.raises(errors.Error) as info:
        app.start()
    took = time.monotonic() - t0
    assert took < within, f"start took {took:.1f}s to fail"
    return info.value


def connections(node: RabbitNode) -> dict[str, dict[str, Any]]:
    """The node's client connections by connection name: user, auth mechanism, TLS."""
    out = node.ctl(
        *("list_connections", "client_properties", "user", "auth_mechanism", "ssl", "--formatter", "json"),
        timeout=CTL_TIMEOUT,
    )
    found: dict[str, dict[str, Any]] = {}
    for row in json.loads(out):
        # client_properties is a list of [key, type, value] triples
        props = {key: value for key, _type, value in row["client_properties"]}
        found[str(props.get("connection_name", "?"))] = row
    return found


# -- PLAIN over TLS ---------------------------------------------------------------------------------


def test_round_trip_over_amqps_with_an_inline_ca(tls_node: RabbitNode, pki: Pki, app_on: Harness) -> None:
    on(app_on, amqps(tls_node), tls={"ca": pki.pem("ca.pem"), "server_name": "localhost"}, **TIMEOUT)
    assert round_trip(app_on, {"n": 1}, "two", [3]) == [{"n": 1}, "two", [3]]


def test_ca_as_a_path_relative_to_the_yaml_file(tls_node: RabbitNode, pki: Pki, app_on: Harness) -> None:
    certs = app_on.tmp_path / "certs"
    certs.mkdir()
    shutil.copy(pki.path("ca.pem"), certs / "ca.pem")
    on(app_on, amqps(tls_node), tls={"ca": "certs/ca.pem", "server_name": "localhost"}, **TIMEOUT)
    assert round_trip(app_on, "by file") == ["by file"]


def test_ca_from_an_environment_variable(
    tls_node: RabbitNode, pki: Pki, app_on: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONVEYOR_TEST_TLS_CA", pki.pem("ca.pem"))
    on(app_on, amqps(tls_node), tls={"ca_env": "CONVEYOR_TEST_TLS_CA", "server_name": "localhost"}, **TIMEOUT)
    assert round_trip(app_on, "by env") == ["by env"]


def test_tls_enabled_switches_an_amqp_url_to_tls(tls_node: RabbitNode, pki: Pki, app_on: Harness) -> None:
    # The port is the TLS listener's: a plain AMQP client would not get past the handshake.
    url = f"amqp://guest:guest@127.0.0.1:{tls_node.tls_port}/"
    on(app_on, url, tls={"enabled": True, "ca": pki.pem("ca.pem"), "server_name": "localhost"}, **TIMEOUT)
    assert round_trip(app_on, "switched") == ["switched"]


def test_the_connection_is_tls_on_the_broker_side(tls_node: RabbitNode, pki: Pki, app_on: Harness) -> None:
    on(
        app_on,
        amqps(tls_node),
        tls={"ca": pki.pem("ca.pem"), "server_name": "localhost"},
        connection_name="conveyor-tls-plain",
        **TIMEOUT,
    )
    app_on.queue("seen")
    with app_on.load():
        row = connections(tls_node)["conveyor-tls-plain"]
    assert row["ssl"] is True and row["user"] == "guest" and row["auth_mechanism"] == "PLAIN"


# -- verification -----------------------------------------------------------------------------------


def test_a_wrong_ca_fails_start_quickly_with_a_certificate_error(
    tls_node: RabbitNode, pki: Pki, app_on: Harness
) -> None:
    on(app_on, amqps(tls_node), tls={"ca": pki.pem("other_ca.pem"), "server_name": "localhost"}, **TIMEOUT)
    error = start_fails(app_on)
    # Not retryable: the app's start does not try it again for its whole startup_timeout.
    assert error.kind == errors.INTERNAL and not error.retryable, error
    assert error.details["reason"] == "tls"
    assert "cannot connect" in error.message and "CERTIFICATE_VERIFY_FAILED" in error.message, error.message
    assert ":guest@" not in error.message, "the password leaked"


def test_server_name_is_the_name_checked_against_the_certificate(
    tls_node: RabbitNode, pki: Pki, app_on: Harness
) -> None:
    on(app_on, amqps(tls_node), tls={"ca": pki.pem("ca.pem"), "server_name": "broker.invalid"}, **TIMEOUT)
    error = start_fails(app_on)
    assert error.kind == errors.INTERNAL and not error.retryable, error
    assert error.details["reason"] == "tls"
    assert "broker.invalid" in error.message and "CERTIFICATE_VERIFY_FAILED" in error.message, error.message


def test_insecure_skip_verify_connects_despite_a_wrong_ca(
    tls_node: RabbitNode, pki: Pki, app_on: Harness
) -> None:
    tls = {"ca": pki.pem("other_ca.pem"), "server_name": "broker.invalid", "insecure_skip_verify": True}
    on(app_on, amqps(tls_node), tls=tls, **TIMEOUT)
    assert round_trip(app_on, "unverified") == ["unverified"]


# -- EXTERNAL: the client certificate is the login -----------------------------------------------------


@pytest.mark.parametrize("given", ["inline", "env", "file"])
def test_external_auth_logs_in_as_the_certificate_common_name(
    tls_node: RabbitNode, pki: Pki, app_on: Harness, monkeypatch: pytest.MonkeyPatch, given: str
) -> None:
    tls: dict[str, Any] = {"ca": pki.pem("ca.pem"), "server_name": "localhost"}
    if given == "inline":
        tls |= {"cert": pki.pem("client.pem"), "key": pki.pem("client.key")}
    elif given == "env":
        monkeypatch.setenv("CONVEYOR_TEST_TLS_CERT", pki.pem("client.pem"))
        monkeypatch.setenv("CONVEYOR_TEST_TLS_KEY", pki.pem("client.key"))
        tls |= {"cert_env": "CONVEYOR_TEST_TLS_CERT", "key_env": "CONVEYOR_TEST_TLS_KEY"}
    else:
        tls |= {"cert": str(pki.path("client.pem")), "key": str(pki.path("client.key"))}
    name = f"conveyor-tls-external-{given}"
    on(
        app_on,
        amqps(tls_node, credentials=""),
        tls=tls,
        auth_mechanism="EXTERNAL",
        connection_name=name,
        **TIMEOUT,
    )
    sink = Sink()
    q = app_on.queue("ext")
    app_on.consumer("worker", "ext", sink.record)
    with app_on.load() as app:
        queue.publish(q, {"as": given})
        app.start_consumers()
        wait_until(lambda: len(sink) == 1, timeout=15)
        row = connections(tls_node)[name]
    assert sink.items == [{"as": given}]
    assert row["user"] == USER and row["auth_mechanism"] == "EXTERNAL" and row["ssl"] is True


def test_external_auth_with_a_certificate_of_an_unknown_user_is_refused(
    tls_node: RabbitNode, pki: Pki, app_on: Harness
) -> None:
    tls = {"ca": pki.pem("ca.pem"), "server_name": "localhost"}
    tls |= {"cert": pki.pem("stranger.pem"), "key": pki.pem("stranger.key")}
    on(app_on, amqps(tls_node, credentials=""), tls=tls, auth_mechanism="EXTERNAL", **TIMEOUT)
    error = start_fails(app_on)
    assert error.kind == errors.PERMISSION_DENIED and not error.retryable, error
    assert "cannot connect" in error.message and "ACCESS_REFUSED" in error.message, error.message
    assert "EXTERNAL" in error.message, error.message


def test_external_auth_without_a_client_certificate_is_refused(
    tls_node: RabbitNode, pki: Pki, app_on: Harness
) -> None:
    on(
        app_on,
        amqps(tls_node, credentials=""),
        tls={"ca": pki.pem("ca.pem"), "server_name": "localhost"},
        auth_mechanism="EXTERNAL",
        **TIMEOUT,
    )
    error = start_fails(app_on)
    assert error.kind == errors.PERMISSION_DENIED and not error.retryable, error
    assert "cannot connect" in error.message and "EXTERNAL" in error.message, error.message


def test_a_client_certificate_from_an_untrusted_ca_is_refused(
    tls_node: RabbitNode, pki: Pki, app_on: Harness
) -> None:
    tls = {"ca": pki.pem("ca.pem"), "server_name": "localhost"}
    tls |= {"cert": pki.pem("rogue.pem"), "key": pki.pem("rogue.key")}
    # The broker answers with a TLS alert (not retryable) or, when the handshake already
    # looked complete to the client, by resetting the connection, which looks like any
    # network failure (retryable): a short startup_timeout bounds the second case.
    on(
        app_on,
        amqps(tls_node, credentials=""),
        tls=tls,
        auth_mechanism="EXTERNAL",
        lifecycle={"startup_timeout": "1s"},
        **TIMEOUT,
    )
    error = start_fails(app_on, within=7)
    assert error.kind == errors.INTERNAL, error
    assert "cannot connect" in error.message, error.message


# -- regressions ------------------------------------------------------------------------------------


def test_tls_enabled_false_keeps_a_plain_connection(tls_node: RabbitNode, pki: Pki, app_on: Harness) -> None:
    """``server_name`` used to reach the plain TCP connect, which refused it: no connection at all."""
    url = f"amqp://guest:guest@127.0.0.1:{tls_node.port}/"
    tls = {"enabled": False, "ca": pki.pem("ca.pem"), "server_name": "localhost"}
    on(app_on, url, tls=tls, connection_name="conveyor-tls-off", **TIMEOUT)
    app_on.queue("plain")
    with app_on.load():
        row = connections(tls_node)["conveyor-tls-off"]
    assert row["ssl"] is False


def test_a_missing_certificate_file_names_the_field_and_the_file(
    tls_node: RabbitNode, pki: Pki, app_on: Harness
) -> None:
    """ssl's FileNotFoundError names no file; it was reported as a retryable connection failure."""
    on(app_on, amqps(tls_node), tls={"ca": "certs/missing-ca.pem", "server_name": "localhost"}, **TIMEOUT)
    error = start_fails(app_on, within=2)
    assert error.kind == errors.INVALID, error
    missing = str(app_on.tmp_path / "certs" / "missing-ca.pem")
    assert f"tls.ca ({missing})" in error.message and "No such file" in error.message, error.message


# -- reconnecting ------------------------------------------------------------------------------------


def test_a_tls_connection_closed_by_the_broker_comes_back_with_the_same_identity(
    tls_node: RabbitNode, pki: Pki, app_on: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONVEYOR_TEST_TLS_CERT", pki.pem("client.pem"))
    monkeypatch.setenv("CONVEYOR_TEST_TLS_KEY", pki.pem("client.key"))
    tls = {"ca": pki.pem("ca.pem"), "server_name": "localhost"}
    tls |= {"cert_env": "CONVEYOR_TEST_TLS_CERT", "key_env": "CONVEYOR_TEST_TLS_KEY"}
    name = "conveyor-tls-reconnect"
    fast = {"reconnect_delay": "200ms", "reconnect_max_delay": "1s"}
    on(
        app_on,
        amqps(tls_node, ""),
        tls=tls,
        auth_mechanism="EXTERNAL",
        connection_name=name,
        **fast,
        **TIMEOUT,
    )
    sink = Sink()
    q = app_on.queue("again")
    app_on.consumer("worker", "again", sink.record)
    with app_on.load() as app:
        app.start_consumers()
        queue.publish(q, "before")
        wait_until(lambda: len(sink) == 1, timeout=15)
        driver = app.runtime.queue(q).driver
        assert isinstance(driver, AmqpDriver)
        tls_node.ctl("close_all_connections", "conveyor TLS test", timeout=CTL_TIMEOUT)
        wait_until(lambda: driver.link.generation >= 2 and driver.link.is_up, timeout=15)
        deadline = time.monotonic() + 15
        while True:  # the publisher's channel may still be the old one for an instant
            try:
                queue.publish(q, "after")
                break
            except errors.Error as exc:
                assert exc.retryable and time.monotonic() < deadline, exc
                time.sleep(0.2)
        wait_until(lambda: len(sink) == 2, timeout=15)
        row = connections(tls_node)[name]
    assert sink.items == ["before", "after"]
    assert row["user"] == USER and row["auth_mechanism"] == "EXTERNAL" and row["ssl"] is True
