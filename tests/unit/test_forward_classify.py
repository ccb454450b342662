"""Every C-STORE outcome lands in exactly one class, and retries back off as documented."""

from __future__ import annotations

import pytest

from fiona.config import ForwardingConfig
from fiona.forwarder.classify import Kind, classify_status
from fiona.forwarder.ledger import backoff


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (0x0000, Kind.SUCCESS),
        (0xB000, Kind.WARNING),
        (0xB006, Kind.WARNING),
        (0xB007, Kind.WARNING),
        (0x0001, Kind.WARNING),
        (0xA700, Kind.TRANSIENT),
        (0xA7FF, Kind.TRANSIENT),
        (0xFE00, Kind.TRANSIENT),
        (None, Kind.TRANSIENT),
        (0xA900, Kind.PERMANENT),
        (0xA9FF, Kind.PERMANENT),
        (0xC000, Kind.PERMANENT),
        (0xC211, Kind.PERMANENT),
        (0x0122, Kind.PERMANENT),
        (0x0124, Kind.PERMANENT),
        (0x0110, Kind.PERMANENT),  # processing failure: nobody said retrying helps
        (0x1234, Kind.PERMANENT),
    ],
)
def test_status_table(status: int | None, kind: Kind) -> None:
    outcome = classify_status(status)
    assert outcome.kind == kind
    assert outcome.status == status
    assert outcome.reason  # the ledger always says why
    if status is not None and kind != Kind.SUCCESS:
        assert f"{status:04X}" in outcome.reason


def test_delivered_means_success_or_warning() -> None:
    assert [k for k in Kind if k.delivered] == [Kind.SUCCESS, Kind.WARNING]


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    policy = ForwardingConfig(retry_base_seconds=10, retry_cap_seconds=300)
    assert backoff(1, policy, lambda: 0.0) == 5.0  # jitter takes at most half away
    assert backoff(1, policy, lambda: 0.999) == pytest.approx(10, rel=1e-3)
    assert backoff(3, policy, lambda: 0.999) == pytest.approx(40, rel=1e-3)
    assert backoff(30, policy, lambda: 0.999) == pytest.approx(300, rel=1e-3)
    assert backoff(10**6, policy, lambda: 0.0) == 150.0  # no overflow for absurd counts


def test_batches_are_split_to_stay_within_128_presentation_contexts() -> None:
    from pathlib import Path

    from fiona.forwarder.ledger import WorkItem
    from fiona.forwarder.senders import MAX_CONTEXTS, _contexts, split_for_contexts

    def item(number: int, syntax: str) -> WorkItem:
        return WorkItem(
            delivery_id=number, request_id=1, instance_id=number, destination="pacs",
            path=Path("x"), digest="",
            project="P", pseudonym="P1", event="", site="", date_offset_days=None,
            sop_class_uid=f"1.2.3.{number}", transfer_syntax_uid=syntax,
            new_study_instance_uid="1", new_series_instance_uid="2",
            new_sop_instance_uid=f"3.{number}", attempts=1,
        )  # fmt: skip

    jpeg = "1.2.840.10008.1.2.4.50"
    batch = [(item(n, jpeg), Path("x")) for n in range(100)]  # 100 SOP classes, 2 syntaxes each
    groups = split_for_contexts(batch)
    assert [len(group) for group in groups] == [63, 37]
    assert all(len(_contexts(group)) <= MAX_CONTEXTS for group in groups)
    assert [pair for group in groups for pair in group] == batch  # nothing lost or reordered
    explicit = "1.2.840.10008.1.2.1"
    assert len(split_for_contexts([(item(n, explicit), Path("x")) for n in range(127)])) == 1
