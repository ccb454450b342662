"""Counters and histograms that ``/metrics`` publishes besides the database's counts.

With the web interface on, ``fiona serve``'s primary points ``PROMETHEUS_MULTIPROC_DIR`` at
``<storage>/metrics`` (emptied at start) before anything imports ``prometheus_client``, so
the receiving workers and the forwarding process, which inherit it, count into shared files
that the primary's ``/metrics`` adds up. Without it (commands, tests) they count in-process.
Labels are outcomes and destination names only: never a UID or a name.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

__all__ = ["DEIDENTIFY_SECONDS", "INSTANCES_RECEIVED", "SEND_SECONDS"]

INSTANCES_RECEIVED = Counter(
    "fiona_instances_received",
    "Instances received (C-STORE, import, upload) by outcome",
    ["outcome"],
)
DEIDENTIFY_SECONDS = Histogram(
    "fiona_deidentify_seconds",
    "De-identifying one instance for a request",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
)
SEND_SECONDS = Histogram(
    "fiona_send_seconds",
    "Sending one batch to a destination, by destination",
    ["destination"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0),
)
