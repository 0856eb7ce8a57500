"""Reply addressing: only the broker's direct reply-to addresses are accepted."""

from __future__ import annotations

import pytest

from modelfleet.addressing import is_direct_reply_to


def test_a_broker_issued_direct_reply_to_address_is_accepted() -> None:
    assert is_direct_reply_to("amq.rabbitmq.reply-to.g1h2AA5yZXBseUAxMjcuMC4wLjEAAAGm.9Yx1Qw==")


@pytest.mark.parametrize(
    "reply_to",
    [
        None,
        "",
        "mft-1.catalog",  # a queue of the namespace
        "other-ns.model.llama",  # another namespace's queue
        "amq.rabbitmq.reply-to",  # the pseudo-queue itself, never what a consumer gets
        "amq.rabbitmq.reply-to.",  # the prefix and nothing after it
        "xamq.rabbitmq.reply-to.abc",
        " amq.rabbitmq.reply-to.abc",
    ],
)
def test_anything_else_is_refused(reply_to: str | None) -> None:
    assert not is_direct_reply_to(reply_to)
