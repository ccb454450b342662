#!/usr/bin/env python3
"""Summarise a ``py-spy record --format raw --threads`` profile of ``fiona serve``.

Buckets every sampled stack of FIONA's receive path into a named stage (first matching
rule wins) and prints samples, share and milliseconds per instance::

    py-spy record --pid PID --rate 250 --format raw --threads [--gil|--idle] -o spy.txt
    python bench/spy_summary.py spy.txt --rate 250 --count 2000
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

# (stage, substrings that must all occur in the stack); the first matching rule wins.
RULES: list[tuple[str, tuple[str, ...]]] = [
    ("writer: SQLite COMMIT (WAL write + fsync)", ("fiona-index-writer", "_do_commit")),
    (
        "writer: ORM flush at commit (INSERT/UPDATE)",
        ("fiona-index-writer", "SessionTransaction.commit"),
    ),
    ("writer: ORM autoflush before SELECT", ("fiona-index-writer", "_autoflush")),
    ("writer: session/transaction begin", ("fiona-index-writer", "begin")),
    ("writer: ORM selects/upsert (_apply_instance)", ("fiona-index-writer", "_apply_instance")),
    (
        "writer: other work (audit/association rows, session setup)",
        ("fiona-index-writer", "IndexWriter._commit"),
    ),
    (
        "writer: short lane COMMIT (WAL write + fsync)",
        ("fiona-index-writer", "_RoutineLane.insert", "COMMIT"),
    ),
    ("writer: short lane INSERT", ("fiona-index-writer", "_RoutineLane")),
    ("writer: waiting for work", ("fiona-index-writer",)),
    ("handler: header parse (read_header, pydicom)", ("read_header",)),
    ("handler: sha256 (file_digest)", ("file_digest",)),
    ("handler: folder fsync (fsync_dir)", ("fsync_dir",)),
    ("handler: file fsync + rename (commit_file)", ("commit_file",)),
    ("handler: free-space check (statvfs)", ("check_space",)),
    ("handler: waiting for index commit (Future.result)", ("Future.result",)),
    ("handler: other", ("handle_store",)),
    ("handler: other", ("store_file",)),
    ("express: C-STORE-RSP encode + send", ("ExpressReceiver._respond",)),
    ("express: next temporary file made ahead", ("ExpressReceiver._prepare_spare",)),
    ("express: temporary file removed/closed", ("ExpressReceiver._close_file",)),
    ("express: command decode + file start", ("ExpressReceiver._begin",)),
    ("express: fragment write + SHA-256 + flush", ("ExpressReceiver._write",)),
    ("express: PDU read (recv_into)", ("ExpressReceiver._read_pdu",)),
    (
        "express: select() readiness poll",
        ("ExpressReceiver.read_pdu_data", "AssociationSocket.ready"),
    ),
    ("express: PDV parsing and checks", ("ExpressReceiver",)),
    ("pynetdicom: C-STORE SCP around handler (response, tmp unlink)", ("StorageServiceClass.SCP",)),
    ("pynetdicom: tmp file create (NamedTemporaryFile)", ("NamedTemporaryFile",)),
    ("pynetdicom: tmp file write (decode_msg)", ("decode_msg", "tempfile.py")),
    ("pynetdicom: DIMSE decode (decode_msg, command set)", ("decode_msg",)),
    ("pynetdicom: command set → primitive", ("message_to_primitive",)),
    ("pynetdicom: PDU decode", ("_decode_pdu",)),
    ("pynetdicom: socket recv", ("AssociationSocket.recv",)),
    ("pynetdicom: select() readiness poll", ("AssociationSocket.ready",)),
    ("pynetdicom: socket send / PDU encode", ("_send",)),
    ("pynetdicom: event triggers", ("events.py",)),
    (
        "pynetdicom: DUL poll sleep (dul.py time.sleep)",
        ("DULServiceProvider.run_reactor (pynetdicom/dul.py:403)",),
    ),
    (
        "pynetdicom: association poll sleep (association.py:714)",
        ("Association._run_reactor (pynetdicom/association.py:714)",),
    ),
    ("pynetdicom: DUL reactor loop", ("DULServiceProvider.run_reactor",)),
    ("pynetdicom: association reactor loop", ("Association._run_reactor",)),
    ("stability sweep (APScheduler)", ("sweep",)),
    ("APScheduler idle", ("APScheduler",)),
    ("main thread (signal wait)", ("MainThread",)),
    ("pynetdicom: server accept loop", ("AcceptorServer",)),
]

LINE = re.compile(r"^(?P<stack>.*) (?P<n>\d+)$")


def classify(stack: str) -> str:
    for name, needles in RULES:
        if all(n in stack for n in needles):
            return name
    return "other"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("raw", type=Path)
    p.add_argument("--rate", type=float, default=100.0, help="py-spy --rate used")
    p.add_argument("--count", type=int, required=True, help="instances received meanwhile")
    p.add_argument("--top-other", type=int, default=0, help="print the N biggest 'other' stacks")
    args = p.parse_args()
    buckets: collections.Counter[str] = collections.Counter()
    others: collections.Counter[str] = collections.Counter()
    for line in args.raw.read_text().splitlines():
        m = LINE.match(line)
        if not m:
            continue
        stack, n = m["stack"], int(m["n"])
        name = classify(stack)
        buckets[name] += n
        if name == "other":
            others[stack] += n
    total = sum(buckets.values())
    print(f"{total} samples = {total / args.rate:.1f} s of thread time; {args.count} instances\n")
    print("| stage | samples | share | ms/instance |")
    print("|---|---|---|---|")
    for name, n in buckets.most_common():
        print(
            f"| {name} | {n} | {100 * n / total:.1f}% | {n / args.rate / args.count * 1000:.3f} |"
        )
    for stack, n in others.most_common(args.top_other):
        print(n, stack[-400:])


if __name__ == "__main__":
    main()
