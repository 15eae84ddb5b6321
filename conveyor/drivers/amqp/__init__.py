"""``queue.driver.amqp``: RabbitMQ and other AMQP 0-9-1 brokers (needs ``conveyor[amqp]``).

The only package that imports the AMQP client library (aiormq, installed by the
``amqp`` extra). ``AmqpDriver`` is the class the driver registry loads.
"""

from __future__ import annotations

from conveyor.drivers.amqp.driver import AmqpDriver

__all__ = ["AmqpDriver"]
