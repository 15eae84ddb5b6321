"""Connection options, TLS contexts and the reconnect backoff (no broker needed)."""

from __future__ import annotations

import random
import ssl
import subprocess
from pathlib import Path

import pytest

from conveyor import errors
from conveyor.drivers.amqp._link import backoff_delays, connection_url, ssl_context
from conveyor.drivers.options.amqp import AmqpOptions, AmqpTls


def test_backoff_grows_exponentially_with_jitter_and_caps() -> None:
    delays = backoff_delays(1.0, 30.0, random.Random(7))
    got = [next(delays) for _ in range(10)]
    nominal = [1, 2, 4, 8, 16, 30, 30, 30, 30, 30]
    for value, bound in zip(got, nominal, strict=True):
        assert bound / 2 <= value <= bound
    assert len({round(v, 6) for v in got[5:]}) > 1, "jitter: capped delays still differ"


def test_url_options() -> None:
    url = connection_url(
        AmqpOptions(url="amqp://u:p@127.0.0.1:5673/", vhost="a/b", heartbeat=2.5, auth_mechanism="AMQPLAIN")
    )
    assert url.raw_path == "/a%2Fb"
    assert url.query["heartbeat"] == "3"  # whole seconds, rounded up
    assert url.query["auth"] == "AMQPLAIN"
    assert url.port == 5673 and url.user == "u"


def test_default_heartbeat_and_tls_scheme() -> None:
    assert connection_url(AmqpOptions(url="amqp://h/")).query["heartbeat"] == "30"
    assert connection_url(AmqpOptions(url="amqp://h/", heartbeat=0)).query["heartbeat"] == "0"
    tls_url = connection_url(AmqpOptions(url="amqp://h/", tls=AmqpTls(enabled=True)))
    assert tls_url.scheme == "amqps" and tls_url.port == 5671
    assert ssl_context(None, connection_url(AmqpOptions(url="amqp://h/"))) is None


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A self-signed certificate and key made with the openssl command."""
    base = tmp_path_factory.mktemp("pem")
    key, cert = base / "key.pem", base / "cert.pem"
    try:
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                str(key),
                "-out",
                str(cert),
                "-days",
                "1",
                "-subj",
                "/CN=localhost",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.CalledProcessError) as exc:  # pragma: no cover - openssl is on the image
        pytest.fail(f"openssl could not make a test certificate: {exc}")
    return {"cert": cert.read_text(), "key": key.read_text(), "cert_path": str(cert), "key_path": str(key)}


def test_tls_with_inline_pem(pem: dict[str, str]) -> None:
    url = connection_url(AmqpOptions(url="amqps://h/"))
    context = ssl_context(AmqpTls(cert=pem["cert"], key=pem["key"], ca=pem["cert"]), url)
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.cert_store_stats()["x509_ca"] == 1


def test_tls_with_files_env_and_insecure(pem: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T_CERT", pem["cert"])
    monkeypatch.setenv("T_KEY", pem["key"])
    url = connection_url(AmqpOptions(url="amqps://h/"))
    context = ssl_context(AmqpTls(cert_env="T_CERT", key_env="T_KEY", insecure_skip_verify=True), url)
    assert context is not None and context.verify_mode == ssl.CERT_NONE and not context.check_hostname
    by_file = ssl_context(AmqpTls(cert=pem["cert_path"], key=pem["key_path"], ca=pem["cert_path"]), url)
    assert by_file is not None


def test_tls_env_variable_missing_is_invalid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOPE_CERT", raising=False)
    with pytest.raises(errors.Error) as info:
        ssl_context(AmqpTls(cert_env="NOPE_CERT"), connection_url(AmqpOptions(url="amqps://h/")))
    assert info.value.kind == errors.INVALID and "NOPE_CERT" in info.value.message


def test_inline_pem_is_written_privately_and_removed(
    pem: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    seen: list[Path] = []
    real = tempfile.NamedTemporaryFile

    def spy(*args: object, **kwargs: object) -> object:
        handle = real(*args, **kwargs)  # type: ignore[call-overload]
        seen.append(Path(handle.name))
        return handle

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", spy)
    ssl_context(AmqpTls(cert=pem["cert"], key=pem["key"]), connection_url(AmqpOptions(url="amqps://h/")))
    assert len(seen) == 2
    assert not any(p.exists() for p in seen)
