"""Where replies may go. Pure; shared by workers and controllers.

Replies are published through the default exchange to the job's ``reply_to``; taken blindly, a
producer could make a worker or the controller write into any queue it names (for example
replace ``{ns}.catalog``). RabbitMQ's direct reply-to is the only reply address modelfleet's
clients use, and the broker itself issues it: ``amq.rabbitmq.reply-to.<opaque>`` on the job, a
name no queue can take (``amq.`` is reserved). Anything else is refused and counted.
"""

from __future__ import annotations

__all__ = ["DIRECT_REPLY_TO_PREFIX", "is_direct_reply_to"]

# What the broker rewrites "amq.rabbitmq.reply-to" into on a published message.
DIRECT_REPLY_TO_PREFIX = "amq.rabbitmq.reply-to."


def is_direct_reply_to(reply_to: str | None) -> bool:
    """Whether ``reply_to`` is a direct reply-to address the broker issued.

    >>> is_direct_reply_to("amq.rabbitmq.reply-to.g1h2AA5yZXBseUAx.9Yx1")
    True
    >>> is_direct_reply_to("modelfleet.catalog")
    False
    """
    return (
        isinstance(reply_to, str)
        and reply_to.startswith(DIRECT_REPLY_TO_PREFIX)
        and len(reply_to) > len(DIRECT_REPLY_TO_PREFIX)
    )
