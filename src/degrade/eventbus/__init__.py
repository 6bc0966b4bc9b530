"""RabbitMQ event publishing that never blocks a request: :class:`EventPublisher`.

``await bus.publish(routing_key, payload)`` puts the event in a bounded
in-process buffer and returns at once; a background sender publishes it with
publisher confirms. Every connect attempt feeds the broker's
:class:`~degrade.Dependency` (its state is the only health state); when the
broker stays unreachable for ``degrade_after`` seconds the publisher degrades:
events are dropped (or written to a :class:`DiskSpool`), each drop counted,
logged in bounded summaries and reported to Sentry with the tag
``eventbus.status=degraded``. See ``docs/eventbus.md``.

Needs the ``rabbitmq`` extra (aio-pika and tenacity): ``pip install 'degrade[rabbitmq]'``.
"""

from __future__ import annotations

from .._extras import require

require("aio_pika", "rabbitmq", feature="degrade.eventbus")
require("tenacity", "rabbitmq", feature="degrade.eventbus")

from .._compat.aiormq import quiet_amqp_logs  # noqa: E402 - after the extras check
from ._outbox import Outbox  # noqa: E402 - after the extras check
from ._outbox_relay import OutboxRelay  # noqa: E402 - after the extras check
from ._outbox_stats import RelayStats  # noqa: E402 - after the extras check
from .publisher import EventPublisher, PublisherStats, PublishResult  # noqa: E402 - after the extras check
from .spool import DiskSpool  # noqa: E402 - after the extras check

__all__ = [
    "DiskSpool",
    "EventPublisher",
    "Outbox",
    "OutboxRelay",
    "PublishResult",
    "PublisherStats",
    "RelayStats",
    "quiet_amqp_logs",
]
