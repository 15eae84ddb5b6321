"""Options of ``queue.driver.amqp`` (see docs/rabbitmq.md for what each one does)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from conveyor.drivers.options import MIB, message_size_option
from conveyor.registry.convert import boolean, choice, duration, integer, string
from conveyor.registry.options import DriverSchema, Options, PathKind, option

__all__ = ["SCHEMA", "AmqpConsumerOptions", "AmqpOptions", "AmqpQueueOptions", "AmqpTls"]

AUTH_MECHANISMS = ("PLAIN", "AMQPLAIN", "EXTERNAL")


def amqp_url(value: Any) -> str:
    text = string(value)
    if not text.startswith(("amqp://", "amqps://")):
        raise ValueError("must start with amqp:// or amqps://")
    return text


@dataclass(frozen=True, slots=True, kw_only=True)
class AmqpTls(Options):
    """The ``tls`` block. PEM comes inline, from a file (next to the YAML) or from ``*_env``."""

    enabled: bool = option(boolean, False)  # switch an amqp:// URL to amqps:// (port 5671)
    server_name: str | None = option(string, None)
    cert: str | None = option(string, None, path=PathKind.FILE_OR_PEM)
    key: str | None = option(string, None, path=PathKind.FILE_OR_PEM)
    ca: str | None = option(string, None, path=PathKind.FILE_OR_PEM)
    cert_env: str | None = option(string, None)  # the name of a variable holding PEM
    key_env: str | None = option(string, None)
    ca_env: str | None = option(string, None)
    insecure_skip_verify: bool = option(boolean, False)


@dataclass(frozen=True, slots=True, kw_only=True)
class AmqpOptions(Options):
    """The ``queue.driver.amqp`` entry."""

    url: str = option(amqp_url, "amqp://guest:guest@localhost:5672/")
    vhost: str | None = option(string, None)
    connection_name: str | None = option(string, None)
    auth_mechanism: str | None = option(choice(*AUTH_MECHANISMS), None)
    heartbeat: float | None = option(duration(), None)  # None: the URL's, else 30 s
    connection_timeout: float = option(duration(positive=True), 15.0)
    reconnect_delay: float = option(duration(positive=True), 1.0)
    reconnect_max_delay: float = option(duration(positive=True), 30.0)
    default_message_ttl: float | None = option(duration(), None)
    # RabbitMQ rejects a zero x-expires: a queue must live for some time.
    default_queue_expiry: float | None = option(duration(positive=True), None)
    prefetch_count: int | None = option(integer(0, 65535), None)
    frame_size: int | None = option(integer(0), None)
    channel_max: int | None = option(integer(0, 65535), None)
    tls: AmqpTls | None = option(AmqpTls, None)
    # RabbitMQ 4's default limit (3.8-3.13: 128 MiB); raise it up to the broker's own
    # max_message_size, itself at most 512 MiB.
    max_message_size: int = message_size_option(maximum=512 * MIB)

    def problems(self) -> list[tuple[str, str]]:
        if self.reconnect_max_delay < self.reconnect_delay:
            message = (
                f"must be >= reconnect_delay ({self.reconnect_delay:g}s), got {self.reconnect_max_delay:g}s"
            )
            return [("reconnect_max_delay", message)]
        return []


@dataclass(frozen=True, slots=True, kw_only=True)
class AmqpQueueOptions(Options):
    """``driver_options.amqp`` on a queue: the broker queue's declaration."""

    durable: bool = option(boolean, True)
    auto_delete: bool = option(boolean, False)
    exclusive: bool = option(boolean, False)
    message_ttl: float | None = option(duration(), None)  # None: the driver's default_message_ttl
    queue_expiry: float | None = option(duration(positive=True), None)  # None: default_queue_expiry
    max_length: int | None = option(integer(1), None)
    overflow: str | None = option(choice("drop-head", "reject-publish", "reject-publish-dlx"), None)
    queue_type: str | None = option(choice("classic", "quorum"), None)
    max_priority: int | None = option(integer(1, 255), None)

    def problems(self) -> list[tuple[str, str]]:
        # RabbitMQ refuses these combinations at declare time; say so at load time instead.
        if self.queue_type != "quorum":
            return []
        bad = (("exclusive", self.exclusive, True), ("auto_delete", self.auto_delete, True))
        found = [
            (key, f"a quorum queue cannot have {key}: true") for key, value, wrong in bad if value is wrong
        ]
        if not self.durable:
            found.append(("durable", "a quorum queue cannot have durable: false"))
        return found


@dataclass(frozen=True, slots=True, kw_only=True)
class AmqpConsumerOptions(Options):
    """``driver_options.amqp`` on a consumer."""

    consumer_tag: str | None = option(string, None)
    exclusive: bool = option(boolean, False)
    no_local: bool = option(boolean, False)  # accepted; RabbitMQ does not implement it
    no_wait: bool = option(boolean, False)  # accepted; the driver always waits for consume-ok


SCHEMA = DriverSchema("amqp", AmqpOptions, AmqpQueueOptions, AmqpConsumerOptions)
