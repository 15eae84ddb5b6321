"""OpenTelemetry tracing: a producer span per publish, a consumer span per delivery.

Built by the ``App`` when tracing is on (``App(..., tracing=None)``: on when a real
``TracerProvider`` is configured when the app starts; see docs/operations.md#tracing).
The two halves plug into the hooks of the runtime:

- :class:`PublishTracing` is the runtime's ``PublishTracer``: one span of kind
  PRODUCER per ``publish``/``publish_many`` call, named ``publish <queue ID>``, child
  of whatever span is current. Its context goes into every message's headers through
  the globally configured propagator (W3C ``traceparent``/``tracestate`` by default).
- :class:`DeliveryTracing` is each consumer's ``DeliveryTracer``: one span of kind
  CONSUMER per delivery handed to the handler, named ``process <queue ID>``, whose
  parent is the context extracted from the message's headers (a new trace when there
  is none). The span is made current in the worker's context before the handler runs,
  so the handler, its log lines and its publishes (also from sync and Lua handlers,
  which run in threads on a copy of that context) belong to it; the settlement tells
  it the outcome (:data:`OUTCOMES`).

Attributes follow the OpenTelemetry messaging semantic conventions (``messaging.*``,
``error.type``); two are conveyor's own: ``messaging.conveyor.attempt`` (deliveries of
the message from this queue, this one included) and ``messaging.conveyor.outcome``.
"""

from __future__ import annotations

from contextvars import Token
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.trace import SpanKind, Status, StatusCode

from conveyor import errors
from conveyor.consumer.settlement import error_text
from conveyor.drivers.base import Delivery, Headers
from conveyor.queue.bound import BoundQueue
from conveyor.registry.model import ConsumerSpec

__all__ = [
    "ATTEMPT",
    "OUTCOME",
    "OUTCOMES",
    "DeliveryTracing",
    "PublishTracing",
    "is_configured",
    "messaging_system",
    "tracers",
]

# Semantic-convention attribute names (messaging, error).
SYSTEM = "messaging.system"
DESTINATION = "messaging.destination.name"
OPERATION_TYPE = "messaging.operation.type"
OPERATION_NAME = "messaging.operation.name"
MESSAGE_ID = "messaging.message.id"
BATCH_COUNT = "messaging.batch.message_count"
BODY_SIZE = "messaging.message.body.size"
CONSUMER_GROUP = "messaging.consumer.group.name"
ERROR_TYPE = "error.type"
# conveyor's own
ATTEMPT = "messaging.conveyor.attempt"
OUTCOME = "messaging.conveyor.outcome"

#: What became of a traced delivery: ``acked``; ``retried`` (a failed attempt, delivered
#: again later); ``dead_lettered``; ``dropped`` (not retryable and no dead-letter queue:
#: acked, logged at ERROR); ``released`` (the consumer stopped mid-handler: back to the
#: queue); ``unsettled`` (the driver refused the settlement: delivered again).
OUTCOMES = ("acked", "retried", "dead_lettered", "dropped", "released", "unsettled")
_FAILED_OUTCOMES = frozenset({"retried", "dead_lettered", "dropped"})

_SYSTEMS = {"queue.driver.amqp": "rabbitmq"}


def messaging_system(driver_kind: str) -> str:
    """``messaging.system`` of a driver kind: ``rabbitmq`` for AMQP, else its short name."""
    return _SYSTEMS.get(driver_kind) or driver_kind.rsplit(".", 1)[-1]


class _HeadersGetter(Getter[Headers]):
    """Reads a propagation field from conveyor headers (string values only)."""

    def get(self, carrier: Headers, key: str) -> list[str] | None:
        value = carrier.get(key)
        return [value] if isinstance(value, str) else None

    def keys(self, carrier: Headers) -> list[str]:
        return list(carrier)


class _HeadersSetter(Setter[dict[str, str]]):
    def set(self, carrier: dict[str, str], key: str, value: str) -> None:
        carrier[key] = value


_GETTER = _HeadersGetter()
_SETTER = _HeadersSetter()


def is_configured() -> bool:
    """True when the global tracer provider is a real one (not the API's proxy or no-op)."""
    provider = trace.get_tracer_provider()
    return not isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider))


def tracers(
    provider: trace.TracerProvider | None, force: bool
) -> tuple[PublishTracing, DeliveryTracing] | None:
    """The tracers of one app start, or None when tracing stays off.

    ``provider``: the app's own tracer provider (None: the global one). Without one and
    without ``force``, tracing is on only when the global provider is a real one.
    """
    if provider is None and not force and not is_configured():
        return None
    import conveyor  # noqa: PLC0415 - the package is fully imported by the time an app starts

    tracer = trace.get_tracer("conveyor", conveyor.__version__, tracer_provider=provider)
    return PublishTracing(tracer), DeliveryTracing(tracer)


def _error_type(exc: BaseException) -> str:
    """``error.type``: a conveyor error's kind, else the exception's qualified class name."""
    if isinstance(exc, errors.Error):
        return exc.kind
    cls = type(exc)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _fail(span: trace.Span, exc: BaseException) -> None:
    span.record_exception(exc)
    span.set_attribute(ERROR_TYPE, _error_type(exc))
    span.set_status(Status(StatusCode.ERROR, error_text(exc)))


class PublishTracing:
    """A producer span per publish call; its context injected into each message's headers."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer
        self._static: dict[str, dict[str, Any]] = {}  # queue ID -> its fixed attributes

    def start(self, queue: BoundQueue, headers: list[Headers]) -> trace.Span:
        static = self._static.get(queue.id)
        if static is None:
            static = self._static[queue.id] = {
                SYSTEM: messaging_system(queue.driver.spec.kind),
                DESTINATION: queue.id,
                OPERATION_TYPE: "send",
                OPERATION_NAME: "publish",
            }
        attributes = static if len(headers) == 1 else {**static, BATCH_COUNT: len(headers)}
        span = self._tracer.start_span(f"publish {queue.id}", kind=SpanKind.PRODUCER, attributes=attributes)
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span), setter=_SETTER)
        if carrier:
            for one in headers:
                one.update(carrier)
        return span

    def end(self, handle: trace.Span, ids: list[str], failure: BaseException | None) -> None:
        if len(ids) == 1:
            handle.set_attribute(MESSAGE_ID, ids[0])
        if failure is not None:
            _fail(handle, failure)
        handle.end()


class _Open:
    """One traced delivery, from ``start`` to ``end``."""

    __slots__ = ("delivery", "error", "outcome", "reason", "span", "token")

    def __init__(self, delivery: Delivery, span: trace.Span, token: Token[Context]) -> None:
        self.delivery = delivery
        self.span = span
        self.token = token
        self.outcome: str | None = None
        self.reason: str | None = None
        self.error: BaseException | None = None


class DeliveryTracing:
    """A consumer span per delivery, current while the handler runs and it is settled.

    One per app start, shared by its consumers; everything runs on the app's loop.
    """

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer
        self._static: dict[str, dict[str, Any]] = {}  # consumer ID -> its fixed attributes
        self._open: dict[Delivery, _Open] = {}  # deliveries between start and end

    def start(self, consumer: ConsumerSpec, queue: BoundQueue, delivery: Delivery) -> _Open:
        static = self._static.get(consumer.id)
        if static is None:
            static = self._static[consumer.id] = {
                SYSTEM: messaging_system(queue.driver.spec.kind),
                DESTINATION: queue.id,
                OPERATION_TYPE: "process",
                OPERATION_NAME: "process",
                CONSUMER_GROUP: consumer.id,
            }
        # The parent is the message's creation context, never what the worker inherited.
        headers = delivery.headers
        parent = propagate.extract(headers, context=Context(), getter=_GETTER) if headers else Context()
        attributes = {
            **static,
            MESSAGE_ID: delivery.id,
            ATTEMPT: delivery.attempts,
            BODY_SIZE: len(delivery.body),
        }
        span = self._tracer.start_span(
            f"process {queue.id}", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        handle = self._open[delivery] = _Open(delivery, span, token)
        return handle

    def settled(
        self, delivery: Delivery, outcome: str, reason: str | None, error: BaseException | None
    ) -> None:
        """The settlement's verdict on ``delivery`` (ignored if it is not traced)."""
        handle = self._open.get(delivery)
        if handle is None:
            return
        handle.outcome = outcome
        handle.reason = reason
        if error is not None:
            handle.error = error

    def end(self, handle: _Open, failure: BaseException | None) -> None:
        self._open.pop(handle.delivery, None)
        span = handle.span
        try:
            outcome = handle.outcome or ("acked" if failure is None else "unsettled")
            span.set_attribute(OUTCOME, outcome)
            error = failure if failure is not None else handle.error
            if error is not None:
                _fail(span, error)
            elif outcome in _FAILED_OUTCOMES:
                span.set_status(Status(StatusCode.ERROR, handle.reason or outcome))
            span.end()
        finally:
            otel_context.detach(handle.token)
