#!/usr/bin/env python3
"""Where does FIONA's receive time go?  A timing harness plus what-if variants.

Runs FIONA's receiving :class:`~fiona.scp.server.Node` in-process (one fresh process per
run), wraps the stages of the C-STORE path with timers — nothing under ``fiona/`` is
edited, the wrappers are installed from here — and sends the benchmark corpus with
``/usr/bin/storescu`` (one association). Variants switch one cost off at a time to measure
what it costs in wall time and CPU (they are what-ifs, not proposals: "no-file-fsync"
breaks FIONA's durability promise):

* ``baseline``       FIONA as configured (1 MB PDU, express receive, fsync + rename,
                     SQLite FULL)
* ``pynetdicom-path`` an observer of received PDUs is bound: every C-STORE takes
                     pynetdicom's own path (DUL, DIMSE, association thread), as before the
                     express receive
* ``no-file-fsync``  os.fsync of the received file and its folder is a no-op
* ``sqlite-normal``  PRAGMA synchronous=NORMAL instead of FULL (WAL: no fsync per commit)
* ``pdu-16k``        node.maximum_pdu_size 16384 (dcmtk storescu sends at most 128 KB PDUs)
* ``all-off``        no-file-fsync + sqlite-normal (an upper bound)

Usage::

    python bench/profile_receive.py --count 1000 --rounds 3 --variants baseline,fast-poll
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import receive  # noqa: E402  (bench/receive.py: corpus and storescu helpers)

VARIANTS = (
    "baseline",
    "pynetdicom-path",
    "no-file-fsync",
    "sqlite-normal",
    "pdu-16k",
    "all-off",
)


# -- the child: one node, one transfer ---------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.durations: dict[str, list[float]] = {}
        self.marks: dict[str, list[float]] = {}
        self.batches: list[int] = []

    def add(self, name: str, seconds: float) -> None:
        self.durations.setdefault(name, []).append(seconds)

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, []).append(time.perf_counter())


def timed(rec: Recorder, name: str, func: Any) -> Any:
    def wrapper(*a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return func(*a, **kw)
        finally:
            rec.add(name, time.perf_counter() - t0)

    wrapper.__wrapped__ = func  # type: ignore[attr-defined]
    return wrapper


def install(rec: Recorder, variant: str) -> None:
    """Timing wrappers and the variant's patch (module attributes, this process only)."""

    import pynetdicom.association
    import pynetdicom.dimse
    import pynetdicom.dul

    from fiona.db import engine as db_engine
    from fiona.scp import express, handlers, index, ingest, server, spool

    ingest.checked_header = timed(rec, "header parse (checked_header)", ingest.checked_header)
    ingest.file_digest = timed(rec, "sha256 digest (file_digest)", ingest.file_digest)
    spool.Spool.commit_file = timed(rec, "rename into place (commit_file)", spool.Spool.commit_file)
    spool.Spool.check_space = timed(rec, "free-space check (statvfs)", spool.Spool.check_space)
    ingest.Ingestor.ingest = timed(rec, "ingest total", ingest.Ingestor.ingest)

    original_index = index.IndexWriter.index_instance

    class TimedFuture:
        def __init__(self, fut: Any) -> None:
            self._fut = fut

        def result(self, timeout: float | None = None) -> Any:
            t0 = time.perf_counter()
            try:
                return self._fut.result(timeout)
            finally:
                rec.add("index commit wait (writer round trip)", time.perf_counter() - t0)

    index.IndexWriter.index_instance = lambda self, record: TimedFuture(  # type: ignore
        original_index(self, record)
    )
    original_commit = index.IndexWriter._commit

    def commit(self: Any, batch: list[Any]) -> None:
        rec.batches.append(len(batch))
        t0 = time.perf_counter()
        try:
            original_commit(self, batch)
        finally:
            rec.add("writer transaction (all work + commit)", time.perf_counter() - t0)

    index.IndexWriter._commit = commit  # type: ignore[method-assign]
    index._RoutineLane.insert = timed(  # type: ignore[method-assign]
        rec, "writer short lane (INSERT + COMMIT)", index._RoutineLane.insert
    )

    # the express path (fiona.scp.express), and the cycle marks on it
    receiver = express.ExpressReceiver
    receiver._read_pdu = timed(rec, "express: PDU read (DUL thread)", receiver._read_pdu)  # type: ignore[method-assign]
    receiver._write = timed(  # type: ignore[method-assign]
        rec, "express: fragments written + SHA-256 (DUL thread)", receiver._write
    )
    receiver._prepare_spare = timed(  # type: ignore[method-assign]
        rec, "express: next temporary file made ahead", receiver._prepare_spare
    )
    original_begin, original_finish = receiver._begin, receiver._finish
    original_respond = receiver._respond

    def begin(self: Any, context_id: int, command: bytes) -> Any:
        rec.mark("command_in")
        return original_begin(self, context_id, command)

    def finish(self: Any, message: Any) -> None:
        rec.mark("data_complete")
        t0 = time.perf_counter()
        try:
            original_finish(self, message)
        finally:
            rec.add("express: store and answer (_finish)", time.perf_counter() - t0)

    def respond(self: Any, message: Any, status: int, comment: Any) -> None:
        original_respond(self, message, status, comment)
        rec.mark("answer_sent")

    receiver._begin = begin  # type: ignore[method-assign]
    receiver._finish = finish  # type: ignore[method-assign]
    receiver._respond = respond  # type: ignore[method-assign]
    handlers.ScpHandlers.store_file = timed(  # type: ignore[method-assign]
        rec, "store_file total (ingest, both paths)", handlers.ScpHandlers.store_file
    )
    if variant == "pynetdicom-path":
        original_bindings = server.event_handlers

        def observed(handlers_: Any) -> list[Any]:
            return [*original_bindings(handlers_), (pynetdicom.evt.EVT_PDU_RECV, lambda e: None)]

        server.event_handlers = observed

    original_store = handlers.ScpHandlers.handle_store

    def handle_store(self: Any, event: Any) -> Any:
        rec.mark("handler_in")
        t0 = time.perf_counter()
        try:
            return original_store(self, event)
        finally:
            rec.add("handle_store total", time.perf_counter() - t0)
            rec.mark("handler_out")

    handlers.ScpHandlers.handle_store = handle_store  # type: ignore[method-assign]

    original_recv = pynetdicom.dimse.DIMSEServiceProvider.receive_primitive

    def receive_primitive(self: Any, primitive: Any) -> None:
        before = self.msg_queue.qsize()
        t0 = time.perf_counter()
        c0 = time.thread_time()
        original_recv(self, primitive)
        rec.add("pynetdicom P-DATA handling (DUL thread)", time.perf_counter() - t0)
        rec.add("pynetdicom P-DATA handling, thread CPU", time.thread_time() - c0)
        if self.msg_queue.qsize() > before:
            rec.mark("msg_ready")

    pynetdicom.dimse.DIMSEServiceProvider.receive_primitive = receive_primitive

    original_read = pynetdicom.dul.DULServiceProvider._read_pdu_data
    original_decode = pynetdicom.dul.DULServiceProvider._decode_pdu

    def read_pdu_data(self: Any) -> None:
        t0 = time.perf_counter()
        original_read(self)
        rec.add("pynetdicom PDU read + decode (DUL thread)", time.perf_counter() - t0)

    def decode_pdu(self: Any, data: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original_decode(self, data)
        finally:
            rec.add("pynetdicom PDU decode (DUL thread)", time.perf_counter() - t0)

    pynetdicom.dul.DULServiceProvider._read_pdu_data = read_pdu_data  # type: ignore[method-assign]
    pynetdicom.dul.DULServiceProvider._decode_pdu = decode_pdu  # type: ignore[method-assign]
    # FIONA's SCP associations decode P-DATA-TF in place (handle_conn_open binds it per
    # association, looking the function up in the handlers module at that moment)
    handlers._decode_pdu_in_place = timed(
        rec, "pynetdicom PDU decode (DUL thread)", handlers._decode_pdu_in_place
    )

    original_send = pynetdicom.dul.DULServiceProvider._send

    def dul_send(self: Any, pdu: Any) -> None:
        original_send(self, pdu)
        rec.mark("pdu_sent")

    pynetdicom.dul.DULServiceProvider._send = dul_send  # type: ignore[method-assign]

    if variant in ("no-file-fsync", "all-off"):
        spool.os.fsync = lambda fd: None  # only FIONA's Python code calls os.fsync here
    if variant in ("sqlite-normal", "all-off"):

        def pragmas(dbapi_connection: Any, _record: Any) -> None:
            cur = dbapi_connection.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        db_engine._sqlite_pragmas = pragmas


def express_cycle(rec: Recorder) -> dict[str, float]:
    """Split each instance's cycle on the express path (command in → next command in)."""
    starts, completes = rec.marks.get("command_in", []), rec.marks.get("data_complete", [])
    answers = rec.marks.get("answer_sent", [])
    phases: dict[str, list[float]] = {
        "A command in → data set complete (receive: PDU reads, file writes, SHA-256)": [],
        "B data set complete → answer sent (store: header, fsync, index, rename)": [],
        "C answer sent → next command in (storescu's turn; next file made ahead)": [],
    }
    for i in range(min(len(starts), len(completes), len(answers)) - 1):
        t_in, t_done, t_sent, t_next = starts[i], completes[i], answers[i], starts[i + 1]
        if not t_in <= t_done <= t_sent <= t_next:
            continue
        phases[
            "A command in → data set complete (receive: PDU reads, file writes, SHA-256)"
        ].append(t_done - t_in)
        phases["B data set complete → answer sent (store: header, fsync, index, rename)"].append(
            t_sent - t_done
        )
        phases["C answer sent → next command in (storescu's turn; next file made ahead)"].append(
            t_next - t_sent
        )
    return {k: statistics.mean(v) * 1000 for k, v in phases.items() if v}


def cycle_breakdown(rec: Recorder) -> dict[str, float]:
    """Split each instance's cycle (handler entry → next handler entry) into phases
    (pynetdicom's path)."""
    hin, hout = rec.marks.get("handler_in", []), rec.marks.get("handler_out", [])
    sent, ready = rec.marks.get("pdu_sent", []), rec.marks.get("msg_ready", [])
    phases: dict[str, list[float]] = {
        "A handler (handle_store)": [],
        "B handler return → response PDU sent (pynetdicom, DUL poll)": [],
        "C response sent → next request complete (storescu, network, DUL receive+tmp write)": [],
        "D request complete → handler entered (association reactor poll, C-STORE setup)": [],
    }
    import bisect

    for i in range(len(hin) - 1):
        t_in, t_out, t_next = hin[i], hout[i], hin[i + 1]
        j = bisect.bisect_right(sent, t_out)
        k = bisect.bisect_right(ready, t_out)
        if j >= len(sent) or k >= len(ready):
            continue
        t_sent, t_ready = sent[j], ready[k]
        if not (t_out <= t_sent <= t_ready <= t_next):
            continue
        phases["A handler (handle_store)"].append(t_out - t_in)
        phases["B handler return → response PDU sent (pynetdicom, DUL poll)"].append(t_sent - t_out)
        phases[
            "C response sent → next request complete (storescu, network, DUL receive+tmp write)"
        ].append(t_ready - t_sent)
        phases[
            "D request complete → handler entered (association reactor poll, C-STORE setup)"
        ].append(t_next - t_ready)
    return {k: statistics.mean(v) * 1000 for k, v in phases.items() if v}


def child(args: argparse.Namespace) -> int:
    from fiona.config import load_config
    from fiona.logs import configure_logging
    from fiona.scp.server import Node

    rec = Recorder()
    install(rec, args.child)
    files = receive.make_corpus(args.corpus, args.count)
    workdir = Path(tempfile.mkdtemp(prefix=f"profile-{args.child}-", dir=args.scratch))
    port = receive.free_port()
    pdu = {"pdu-16k": 16384, "pdu-128k": 131072}.get(args.child, 1048576)
    cfg = workdir / "fiona.yaml"
    cfg.write_text(
        f"node: {{ae_title: FIONA, host: '127.0.0.1', port: {port}, "
        f"maximum_pdu_size: {pdu}}}\n"
        f"storage: {{path: '{workdir / 'spool'}'}}\n"
        f"database: {{url: 'sqlite:///{workdir / 'fiona.db'}'}}\n"
        "stable_after_seconds: 600\nlogging: {level: INFO}\n"
    )
    config = load_config(cfg)
    log_stream = open(workdir / "node.log", "w")  # noqa: SIM115 - lives as long as the node
    configure_logging("WARNING", stream=log_stream)
    node = Node(config)
    node.start()
    try:
        t_cpu0 = os.times()
        result = receive.send(files, port, "FIONA", 1, args.send_timeout)
        t_cpu1 = os.times()
    finally:
        node.stop(5)
    n = len(files)
    cpu = (t_cpu1.user + t_cpu1.system) - (t_cpu0.user + t_cpu0.system)
    stages = {
        k: {
            "mean_ms": statistics.mean(v) * 1000,
            "median_ms": statistics.median(v) * 1000,
            "calls": len(v),
        }
        for k, v in rec.durations.items()
    }
    out = {
        "variant": args.child,
        "count": n,
        "errors": result.errors,
        "sent": result.sent,
        "instances_per_s": n / result.assoc_s,
        "server_cpu_ms_per_instance": cpu * 1000 / n,
        "stages": stages,
        "cycle_ms": express_cycle(rec) or cycle_breakdown(rec),
        "writer_batch_mean": statistics.mean(rec.batches) if rec.batches else 0,
    }
    subprocess.run(["rm", "-rf", str(workdir)], check=False)
    print(json.dumps(out))
    return 0


# -- the parent: alternate variants, summarise -----------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--variants", default="baseline,pynetdicom-path,no-file-fsync,sqlite-normal,all-off"
    )
    p.add_argument("--corpus", type=Path, default=receive.DEFAULT_CORPUS)
    p.add_argument("--scratch", type=Path, default=receive.OUT / "rounds")
    p.add_argument("--send-timeout", type=float, default=600.0)
    p.add_argument("--json", type=Path)
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.scratch.mkdir(parents=True, exist_ok=True)
    if args.child:
        return child(args)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}; choose from {VARIANTS}")
    receive.make_corpus(args.corpus, args.count)
    runs: list[dict[str, Any]] = []
    for rnd in range(1, args.rounds + 1):
        k = (rnd - 1) % len(variants)
        for variant in variants[k:] + variants[:k]:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                variant,
                "--count",
                str(args.count),
                "--corpus",
                str(args.corpus),
                "--scratch",
                str(args.scratch),
                "--send-timeout",
                str(args.send_timeout),
            ]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.send_timeout + 120)
            try:
                out = json.loads(r.stdout.strip().splitlines()[-1])
            except (IndexError, json.JSONDecodeError):
                print(f"round {rnd} {variant}: FAILED\n{r.stderr[-2000:]}", file=sys.stderr)
                continue
            out["round"] = rnd
            runs.append(out)
            ok = (
                "ok"
                if not out["errors"] and out["sent"] == out["count"]
                else f"ERRORS {out['errors'][:2]}"
            )
            print(
                f"round {rnd} {variant:14s} {out['instances_per_s']:6.1f} inst/s  "
                f"cpu {out['server_cpu_ms_per_instance']:5.2f} ms/inst  {ok}",
                flush=True,
            )
            os.sync()
    print("\n| variant | inst/s median | wall ms/inst | Δ wall ms/inst vs baseline | CPU ms/inst |")
    print("|---|---|---|---|---|")
    med: dict[str, tuple[float, float]] = {}
    for v in variants:
        mine = [r for r in runs if r["variant"] == v]
        if mine:
            med[v] = (
                statistics.median(r["instances_per_s"] for r in mine),
                statistics.median(r["server_cpu_ms_per_instance"] for r in mine),
            )
    base = med.get("baseline")
    for v, (rate, cpu) in med.items():
        delta = f"{1000 / rate - 1000 / base[0]:+.2f}" if base else ""
        print(f"| {v} | {rate:.0f} | {1000 / rate:.2f} | {delta} | {cpu:.2f} |")
    for v in variants:
        mine = [r for r in runs if r["variant"] == v]
        if not mine:
            continue
        print(f"\n{v}: per-instance stage times (mean ms, median over rounds)")
        names = list(mine[0]["stages"])
        for name in names:
            vals = [r["stages"][name]["mean_ms"] for r in mine if name in r["stages"]]
            calls = [r["stages"][name]["calls"] for r in mine if name in r["stages"]]
            print(
                f"  {name:55s} {statistics.median(vals):7.3f}"
                f"  ({statistics.median(calls) / args.count:.1f} calls/instance)"
            )
        print("  cycle (handler entry → next handler entry):")
        for name in mine[0]["cycle_ms"]:
            vals = [r["cycle_ms"][name] for r in mine if name in r["cycle_ms"]]
            print(f"    {name:85s} {statistics.median(vals):7.3f}")
        print(
            f"  writer batch size (mean): "
            f"{statistics.median(r['writer_batch_mean'] for r in mine):.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
