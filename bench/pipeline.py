#!/usr/bin/env python3
"""End-to-end benchmark (issue 4): dcmtk ``storescu`` → ``fiona serve`` → Orthanc, vs straight.

(a) **FIONA**: a fresh Orthanc (``tests/peers.py``) as the research PACS and a fresh
``fiona serve`` (subprocess, SQLite, spool in a temporary folder, a free port,
``stable_after_seconds`` = ``--stable-after``) with one project ``BICAM`` (``profile: mmiv``,
``uid_scheme: mmiv``) whose one destination is that Orthanc. The corpus (one study, synthetic
CT, 512x512 16-bit) is sent with ``/usr/bin/storescu`` to the project's AE title ``BICAM``
(``projects.BICAM.ae_titles``, mode B): FIONA's router creates the transfer request at the
study's first instance (the incoming PatientID is the pseudonym) and the request streams the
study to Orthanc while it arrives; the request completes once the study is stable. Measured:

* ``send``: storescu's start to its last C-STORE response (FIONA acknowledged the last
  instance);
* ``latency``: that last acknowledgement to the moment Orthanc holds every instance (its REST
  ``/statistics`` is polled every ``--poll-orthanc`` seconds), and the same minus
  ``stable_after_seconds`` (the forwarding part alone);
* ``end to end``: storescu's start to the last instance in Orthanc, and instances/s over it.

FIONA's own log lines ("study stable", "requests prepared", "batch sent") and its delivery
ledger, and the first instance seen in Orthanc, split the latency into phases. ``--spy DIR``
additionally records ``py-spy`` (non-blocking, per thread; ``--spy-mode idle``: wall time of
every thread, ``gil``: Python CPU) on ``fiona serve`` from the last acknowledgement until the
study is complete in Orthanc, and buckets the samples per thread and stage. ``--batch-size``,
``--max-associations``, ``--poll-seconds`` and ``--orthanc-pdu`` change one knob for a
what-if run.

(b) **baseline**: the same corpus sent with storescu straight to a fresh Orthanc; storescu's
start to its last response (Orthanc stores before it answers).

(a) and (b) alternate for ``--rounds`` rounds (the order rotates), fresh servers every round.
Reported: medians, the ratio FIONA end to end / straight to Orthanc (target ≥ 0.5, issue 4)
and the latency against ``stable_after_seconds`` + 10 s (issue 4, for 500 instances).

Traffic stays on 127.0.0.1 (Orthanc and storescp cannot be told to listen on loopback only;
see ``/work/shared/design/TESTING.md``). Every dcmtk tool and Orthanc run with
``TCP_NODELAY=1``. All data are synthetic (``bench/anonymize.py``'s corpus builder: names
``BENCH^...``, UIDs under ``2.25.``).

Usage::

    python bench/pipeline.py --count 500 --rounds 3 --json bench/out/pipeline.json
    python bench/pipeline.py --rounds 2 --only fiona --spy bench/out/spy --spy-mode gil
    python bench/pipeline.py --fiona-rev HEAD ...   # measure a clean export of a commit

``--fiona-rev REV`` exports ``fiona/`` at REV (``git archive``) and runs that; ``--fiona-src
DIR`` runs the ``fiona`` package found in DIR (a scratch copy with a proposed change).
Default: the package this checkout imports.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"
for _folder in (HERE, REPO / "tests"):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

# bench/anonymize.py's realistic CT header (137 top-level elements, private blocks): the
# mmiv profile has real work to do. bench/receive.py's process helpers.
from anonymize import make_corpus  # noqa: E402
from receive import (  # noqa: E402
    ECHOSCU,
    ORTHANC,
    STORESCU,
    clear_scratch,
    cpu_times,
    dcmtk_env,
    export_rev,
    git_state,
    prepare_scratch,
    retire_round_folder,
    wait_echo,
)

HOST = "127.0.0.1"
NODE_AE = "FIONA"
PROJECT = "BICAM"
PROJECT_AE = "BICAM"  # the called AE title that routes to the project (mode B)
PSEUDONYM = "BENCH0001"  # the corpus' PatientID: mode B keeps it as the pseudonym
DESTINATION = "research-pacs"
TARGET_RATIO = 0.5  # issue 4: end-to-end throughput >= 0.5x straight to Orthanc
LATENCY_SLACK_S = 10.0  # issue 4: latency <= stable_after_seconds + 10 s for 500 instances
DEFAULT_CORPUS = OUT / "pipeline-corpus"
PY_SPY = "py-spy"


# -- sending ------------------------------------------------------------------------------------


@dataclass
class Sent:
    """One storescu run. Times are ``time.time()`` (comparable with FIONA's log stamps)."""

    started: float
    last_ack: float  # the last C-STORE response read (FIONA/Orthanc acknowledged it)
    exited: float
    acked: int
    errors: list[str] = field(default_factory=list)


class StoreSCU:
    """``storescu -v`` in the background; its output lines are time-stamped as they come."""

    def __init__(self, files: list[Path], port: int, called_ae: str) -> None:
        self.lines: list[tuple[float, str]] = []
        self.started = time.time()
        self.proc = subprocess.Popen(
            [
                STORESCU, "-v", "-aet", "BENCH", "-aec", called_ae, "-nh",
                "-to", "10", "-ta", "30", "-td", "60", HOST, str(port), *map(str, files),
            ],
            env=dcmtk_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            self.lines.append((time.time(), raw.decode("utf-8", "replace").rstrip()))

    def wait(self, timeout: float) -> Sent:
        errors: list[str] = []
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            errors.append(f"storescu killed after {timeout} s")
        exited = time.time()
        self.reader.join(10)
        if self.proc.returncode != 0:
            errors.append(f"storescu exit status {self.proc.returncode}")
        acks = [ts for ts, text in self.lines if "Received Store Response (Success)" in text]
        errors += [
            text
            for _ts, text in self.lines
            if text.startswith(("E:", "F:")) or "Store Failed" in text
        ]
        last_ack = max(acks) if acks else exited
        return Sent(self.started, last_ack, exited, len(acks), errors[:20])


# -- servers ------------------------------------------------------------------------------------


def start_orthanc(folder: Path, max_pdu: int | None = None) -> Any:
    from peers import Orthanc  # tests/peers.py: config, TCP_NODELAY, readiness

    extra = {"MaximumPduLength": max_pdu} if max_pdu else None
    pacs = Orthanc(folder, extra_config=extra)
    pacs.start(timeout=60)
    return pacs


def orthanc_count(url: str) -> int:
    with urllib.request.urlopen(f"{url}/statistics", timeout=30) as resp:
        return int(json.load(resp)["CountInstances"])


class FionaServe:
    """``fiona serve`` with project BICAM forwarding to one DICOM destination."""

    def __init__(
        self, workdir: Path, args: argparse.Namespace, dest_port: int, fiona_src: Path | None
    ) -> None:
        from fionatest import free_port

        self.workdir = workdir
        self.port = free_port()
        self.storage = workdir / "spool"
        self.db_url = f"sqlite:///{workdir / 'fiona.db'}"
        self.config_path = workdir / "fiona.yaml"
        self.log_path = workdir / "fiona.log"
        forwarding = (
            f"forwarding:\n  poll_seconds: {args.poll_seconds}\n" if args.poll_seconds else ""
        )
        self.config_path.write_text(
            "node:\n"
            f"  ae_title: {NODE_AE}\n"
            f"  host: {HOST}\n"
            f"  port: {self.port}\n"
            "storage:\n"
            f"  path: {self.storage}\n"
            "  min_free_mb: 512\n"
            "database:\n"
            f'  url: "{self.db_url}"\n'
            f"stable_after_seconds: {args.stable_after}\n"
            "logging:\n"
            "  level: INFO\n"
            "projects:\n"
            f"  {PROJECT}:\n"
            f"    ae_titles: [{PROJECT_AE}]\n"
            "    profile: mmiv\n"
            "    uid_scheme: mmiv\n"
            f"    destinations: [{DESTINATION}]\n"
            "destinations:\n"
            f"  {DESTINATION}:\n"
            "    kind: dicom\n"
            f"    host: {HOST}\n"
            f"    port: {dest_port}\n"
            "    ae_title: ORTHANC\n"
            + (f"    batch_size: {args.batch_size}\n" if args.batch_size else "")
            + (f"    max_associations: {args.max_associations}\n" if args.max_associations else "")
            + forwarding
        )
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if fiona_src is not None:
            env["PYTHONPATH"] = os.pathsep.join(
                [str(fiona_src), *filter(None, [os.environ.get("PYTHONPATH")])]
            )
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fiona", "serve", "--config", str(self.config_path)],
            cwd=workdir,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while '"forwarder started"' not in self.log_path.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fiona serve did not start:\n{self.log_text()[-2000:]}")
            time.sleep(0.05)
        wait_echo(self.port, NODE_AE, self.proc, timeout=60)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def stop(self) -> int:
        code: int
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                code = -9
        else:
            code = int(self.proc.returncode)
        self.log.close()
        return code


def routed_request(server: FionaServe, study_uid: str, timeout: float) -> int:
    """The transfer request FIONA's router made for the study (at its first instance)."""
    from sqlalchemy import select

    from fiona.db import TransferRequest, make_engine

    engine = make_engine(server.db_url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            with engine.connect() as conn:
                found = conn.execute(
                    select(TransferRequest.id, TransferRequest.source).where(
                        TransferRequest.study_instance_uid == study_uid
                    )
                ).first()
            if found is not None:
                if found.source != "ae-title":
                    raise RuntimeError(f"request made by {found.source!r}, not the AE title")
                return int(found.id)
            if time.monotonic() > deadline:
                raise RuntimeError("FIONA's router made no request for the study")
            time.sleep(0.05)
    finally:
        engine.dispose()


def ledger_facts(server: FionaServe, request_id: int) -> dict[str, Any]:
    """The request's outcome and the ledger's timestamps (as ``time.time()`` values)."""
    from sqlalchemy import func, select

    from fiona.db import Delivery, DeliveryState, Study, TransferRequest, make_engine

    engine = make_engine(server.db_url)
    try:
        with engine.connect() as conn:
            status, mapped = conn.execute(
                select(TransferRequest.status, TransferRequest.transfer_mapped_uid).where(
                    TransferRequest.id == request_id
                )
            ).one()
            stable_at = conn.execute(select(func.max(Study.stable_at))).scalar()
            rows = conn.execute(
                select(
                    Delivery.state, Delivery.attempts, Delivery.created_at, Delivery.acknowledged_at
                ).where(Delivery.request_id == request_id)
            ).all()
    finally:
        engine.dispose()
    acks = sorted({r.acknowledged_at.timestamp() for r in rows if r.acknowledged_at})
    created = [r.created_at.timestamp() for r in rows]
    return {
        "status": str(getattr(status, "value", status)),
        "new_study_instance_uid": mapped,
        "deliveries": len(rows),
        "delivered": sum(1 for r in rows if r.state == DeliveryState.DELIVERED),
        "attempts": sum(r.attempts for r in rows),
        "study_stable_at": stable_at.timestamp() if stable_at else None,
        "pipeline_step_at": min(created) if created else None,
        "batch_acks": acks,
    }


# -- py-spy ------------------------------------------------------------------------------------

# (stage, substrings that must all occur in a stack); the first matching rule wins.
SPY_RULES: list[tuple[str, tuple[str, ...]]] = [
    # A needle starting with "$" must be in the innermost frame (the function's own time).
    ("prepare: read original file", ("prepare (fiona/forwarder/ledger.py", "read_bytes")),
    ("prepare: de-identify (anonymize_bytes)", ("prepare (fiona", "anonymize_bytes")),
    ("prepare: ledger insert, audit, rollup (DB)", ("prepare (fiona", "sqlalchemy")),
    ("prepare: SHA-256 of output (own time)", ("prepare (fiona", "$_prepare_one (fiona")),
    ("prepare: other", ("prepare (fiona",)),
    ("pipeline: activate/recover (DB)", ("fiona-forward-pipeline", "sqlalchemy")),
    ("pipeline: idle (poll wait)", ("fiona-forward-pipeline", "wait")),
    ("pipeline: other", ("fiona-forward-pipeline",)),
    ("sender: claim (DB)", ("claim (fiona",)),
    ("sender: record + rollup (DB)", ("record (fiona",)),
    ("sender: breaker check (DB)", ("_breaker_allows (fiona",)),
    ("sender: account (DB)", ("_account (fiona",)),
    ("sender: rebuild - read original", ("deidentify_item (fiona", "read_bytes")),
    ("sender: rebuild - de-identify", ("deidentify_item (fiona", "anonymize_bytes")),
    ("sender: rebuild - SHA-256 check (own time)", ("deidentify_item (fiona",)),
    ("sender: spill to tmp file", ("_spill (fiona",)),
    ("sender: association setup", ("associate (pynetdicom",)),
    ("sender: association release", ("release (pynetdicom",)),
    ("sender: C-STORE - wait for response", ("send_c_store (pynetdicom", "get_msg")),
    ("sender: C-STORE - tmp file unlink", ("_store (fiona", "unlink")),
    ("sender: C-STORE - encode/send dataset", ("send_c_store (pynetdicom",)),
    ("sender: idle (poll wait)", ("fiona-forward-", "_pause (fiona")),
    ("sender: other", ("fiona-forward-",)),
    ("pynetdicom SCU: DUL reactor threads", ("DULServiceProvider",)),
    ("pynetdicom SCU: association reactor threads", ("Association._run_reactor",)),
    ("stability sweep", ("sweep (fiona",)),
    ("idle: scheduler, main, accept loop, writer", ("APScheduler",)),
    ("idle: scheduler, main, accept loop, writer", ("MainThread",)),
    ("idle: scheduler, main, accept loop, writer", ("AcceptorServer",)),
    ("idle: scheduler, main, accept loop, writer", ("fiona-index-writer",)),
    ("idle: scheduler, main, accept loop, writer", ("fiona-acceptor",)),
    ("idle: scheduler, main, accept loop, writer", ("ThreadPoolExecutor",)),
]
_SPY_LINE = re.compile(r"^(?P<stack>.*) (?P<n>\d+)$")


def spy_start(pid: int, out: Path, rate: int, mode: str) -> subprocess.Popen[bytes]:
    """py-spy on *pid*: ``idle`` = wall time of every thread, ``active`` = threads not
    waiting (roughly on CPU, C code such as hashing included), ``gil`` = the GIL holder."""
    flags = {"idle": ["--idle"], "active": [], "gil": ["--gil"]}[mode]
    return subprocess.Popen(
        [
            PY_SPY, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
            "--threads", *flags, "--nonblocking", "-o", str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip


def spy_stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def spy_classify(stack: str) -> str:
    leaf = stack.rsplit(";", 1)[-1]
    for name, needles in SPY_RULES:
        if all((n[1:] in leaf) if n.startswith("$") else (n in stack) for n in needles):
            return name
    return "other"


def spy_buckets(raw: Path) -> dict[str, int]:
    buckets: collections.Counter[str] = collections.Counter()
    if not raw.exists():
        return {}
    for line in raw.read_text(errors="replace").splitlines():
        m = _SPY_LINE.match(line)
        if not m:
            continue
        stack = m["stack"]
        buckets[spy_classify(stack)] += int(m["n"])
    return dict(buckets.most_common())


# -- rounds -----------------------------------------------------------------------------------


@dataclass
class FionaRound:
    round: int
    count: int
    send_s: float
    receive_per_s: float
    latency_s: float  # last ack by FIONA -> last instance in Orthanc
    forwarding_s: float  # latency - stable_after_seconds
    end_to_end_s: float  # storescu start -> last instance in Orthanc
    end_to_end_per_s: float
    phases: dict[str, float]  # seconds from the last ack, from FIONA's log and ledger
    batches: list[dict[str, Any]]
    fiona_cpu_receive_ms_per_instance: float
    fiona_cpu_forward_ms_per_instance: float
    orthanc_cpu_ms_per_instance: float
    request_status: str
    attempts: int
    in_orthanc: int
    spy: dict[str, int]
    ok: bool
    problems: list[str]


@dataclass
class BaselineRound:
    round: int
    count: int
    send_s: float
    per_s: float
    orthanc_cpu_ms_per_instance: float
    in_orthanc: int
    ok: bool
    problems: list[str]


def failed_fiona_round(rnd: int, count: int, problem: str) -> FionaRound:
    zeros = (0.0,) * 6
    return FionaRound(rnd, count, *zeros, {}, [], 0, 0, 0, "", 0, 0, {}, False, [problem])


def _ts(event: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


def run_fiona(
    rnd: int,
    files: list[Path],
    study_uid: str,
    args: argparse.Namespace,
    scratch: Path,
    fiona_src: Path | None,
) -> FionaRound:
    workdir = Path(tempfile.mkdtemp(prefix=f"fiona-r{rnd}-", dir=scratch))
    n = len(files)
    problems: list[str] = []
    pacs = start_orthanc(workdir / "orthanc", args.orthanc_pdu)
    server: FionaServe | None = None
    spy_proc = None
    spy: dict[str, int] = {}
    try:
        server = FionaServe(workdir, args, pacs.dicom_port, fiona_src)
        cpu0 = cpu_times(server.proc.pid)
        o_cpu0 = cpu_times(pacs.pid)
        scu = StoreSCU(files, server.port, PROJECT_AE)
        request_id = routed_request(server, study_uid, args.send_timeout)
        sent = scu.wait(args.send_timeout)
        cpu1 = cpu_times(server.proc.pid)
        problems += sent.errors
        if args.spy:
            args.spy.mkdir(parents=True, exist_ok=True)
            spy_raw = args.spy / f"fiona-r{rnd}.txt"
            spy_proc = spy_start(server.proc.pid, spy_raw, args.spy_rate, args.spy_mode)
        deadline = sent.last_ack + args.stable_after + args.forward_timeout
        in_orthanc = 0
        done = time.time()
        first_in: float | None = None
        while time.time() < deadline:
            in_orthanc = orthanc_count(pacs.url)
            done = time.time()
            if in_orthanc and first_in is None:
                first_in = done
            if in_orthanc >= n:
                break
            if server.proc.poll() is not None:
                problems.append(f"fiona serve exited with {server.proc.returncode}")
                break
            time.sleep(args.poll_orthanc)
        else:
            problems.append(f"Orthanc has {in_orthanc} of {n} after the forward timeout")
        cpu2 = cpu_times(server.proc.pid)
        o_cpu2 = cpu_times(pacs.pid)
        if spy_proc is not None:
            spy_stop(spy_proc)
            spy = spy_buckets(spy_raw)
        # The request completes once the study is stable (FIONA streams the study while it
        # arrives, so the instances may all be in Orthanc before that): wait for it.
        complete_by = sent.last_ack + args.stable_after + 15
        facts = ledger_facts(server, request_id)
        while facts["status"] != "sent" and time.time() < complete_by:
            time.sleep(0.2)
            facts = ledger_facts(server, request_id)
        if facts["status"] != "sent":
            problems.append(f"request status {facts['status']}")
        studies = pacs.studies()
        patient_ids = {s.get("PatientMainDicomTags", {}).get("PatientID") for s in studies}
        if len(studies) != 1 or patient_ids != {PSEUDONYM}:
            problems.append(f"Orthanc holds {len(studies)} studies, PatientIDs {patient_ids}")
    finally:
        code = server.stop() if server is not None else 0
        pacs.stop()
    if code != 0:
        problems.append(f"fiona serve exit status {code}")
    if sent.acked != n:
        problems.append(f"storescu: {sent.acked} successful stores of {n}")

    events = server.events()
    ack = sent.last_ack
    phases: dict[str, float] = {}
    stable = [_ts(e) for e in events if e.get("event") == "study stable"]
    prepared = [_ts(e) for e in events if e.get("event") == "requests prepared"]
    batch_events = [e for e in events if e.get("event") == "batch sent"]
    if stable:
        phases["study_stable"] = stable[-1] - ack
    if facts.get("pipeline_step_at"):
        phases["pipeline_step_start"] = facts["pipeline_step_at"] - ack
    if prepared:
        phases["prepared"] = prepared[-1] - ack
    if batch_events:
        phases["first_batch_sent"] = _ts(batch_events[0]) - ack
        phases["last_batch_sent"] = _ts(batch_events[-1]) - ack
    if first_in is not None:
        phases["first_in_orthanc"] = first_in - ack
    phases["all_in_orthanc"] = done - ack
    batches = [
        {
            "t": round(_ts(e) - ack, 3),
            "instances": e.get("instances"),
            "delivered": e.get("delivered"),
        }
        for e in batch_events
    ]
    rr = FionaRound(
        round=rnd,
        count=n,
        send_s=round(ack - sent.started, 3),
        receive_per_s=round(n / (ack - sent.started), 1),
        latency_s=round(done - ack, 3),
        forwarding_s=round(done - ack - args.stable_after, 3),
        end_to_end_s=round(done - sent.started, 3),
        end_to_end_per_s=round(n / (done - sent.started), 1),
        phases={k: round(v, 3) for k, v in phases.items()},
        batches=batches,
        fiona_cpu_receive_ms_per_instance=round((sum(cpu1) - sum(cpu0)) * 1000 / n, 2),
        fiona_cpu_forward_ms_per_instance=round((sum(cpu2) - sum(cpu1)) * 1000 / n, 2),
        orthanc_cpu_ms_per_instance=round((sum(o_cpu2) - sum(o_cpu0)) * 1000 / n, 2),
        request_status=facts["status"],
        attempts=facts["attempts"],
        in_orthanc=in_orthanc,
        spy=spy,
        ok=not problems,
        problems=problems,
    )
    slow = done - ack > args.stable_after + 10  # the latency target, missed
    if args.keep or problems or slow:  # such a round keeps its logs and database to look at
        print(f"  kept {workdir}", file=sys.stderr)
    else:
        retire_round_folder(workdir)
    return rr


def run_baseline(
    rnd: int, files: list[Path], args: argparse.Namespace, scratch: Path
) -> BaselineRound:
    workdir = Path(tempfile.mkdtemp(prefix=f"orthanc-r{rnd}-", dir=scratch))
    n = len(files)
    pacs = start_orthanc(workdir / "orthanc", args.orthanc_pdu)
    try:
        cpu0 = cpu_times(pacs.pid)
        sent = StoreSCU(files, pacs.dicom_port, pacs.ae_title).wait(args.send_timeout)
        cpu1 = cpu_times(pacs.pid)
        in_orthanc = orthanc_count(pacs.url)
    finally:
        pacs.stop()
    problems = list(sent.errors)
    if sent.acked != n:
        problems.append(f"storescu: {sent.acked} successful stores of {n}")
    if in_orthanc != n:
        problems.append(f"Orthanc has {in_orthanc} of {n}")
    rr = BaselineRound(
        round=rnd,
        count=n,
        send_s=round(sent.last_ack - sent.started, 3),
        per_s=round(n / (sent.last_ack - sent.started), 1),
        orthanc_cpu_ms_per_instance=round((sum(cpu1) - sum(cpu0)) * 1000 / n, 2),
        in_orthanc=in_orthanc,
        ok=not problems,
        problems=problems,
    )
    if not args.keep:
        retire_round_folder(workdir)
    return rr


# -- summary ----------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3) if values else float("nan")


def summarise(
    fiona: list[FionaRound], base: list[BaselineRound], args: argparse.Namespace
) -> dict[str, Any]:
    ok_f = [r for r in fiona if r.ok]
    ok_b = [r for r in base if r.ok]
    target_latency = args.stable_after + LATENCY_SLACK_S
    phase_names = sorted({k for r in ok_f for k in r.phases}, key=lambda k: _median(
        [r.phases[k] for r in ok_f if k in r.phases]))  # fmt: skip
    summary: dict[str, Any] = {
        "count": args.count,
        "stable_after_seconds": args.stable_after,
        "fiona_rounds_ok": f"{len(ok_f)}/{len(fiona)}",
        "baseline_rounds_ok": f"{len(ok_b)}/{len(base)}",
        "fiona_send_s": _median([r.send_s for r in ok_f]),
        "fiona_receive_per_s": _median([r.receive_per_s for r in ok_f]),
        "fiona_latency_s": _median([r.latency_s for r in ok_f]),
        "fiona_latency_s_max": max((r.latency_s for r in ok_f), default=float("nan")),
        "fiona_forwarding_s": _median([r.forwarding_s for r in ok_f]),
        "fiona_forwarding_per_s": _median([r.count / r.forwarding_s for r in ok_f]),
        "fiona_end_to_end_s": _median([r.end_to_end_s for r in ok_f]),
        "fiona_end_to_end_per_s": _median([r.end_to_end_per_s for r in ok_f]),
        "fiona_end_to_end_per_s_range": [
            min((r.end_to_end_per_s for r in ok_f), default=float("nan")),
            max((r.end_to_end_per_s for r in ok_f), default=float("nan")),
        ],
        "fiona_cpu_receive_ms_per_instance": _median(
            [r.fiona_cpu_receive_ms_per_instance for r in ok_f]
        ),
        "fiona_cpu_forward_ms_per_instance": _median(
            [r.fiona_cpu_forward_ms_per_instance for r in ok_f]
        ),
        "orthanc_cpu_ms_per_instance_behind_fiona": _median(
            [r.orthanc_cpu_ms_per_instance for r in ok_f]
        ),
        "phases_from_last_ack_s": {
            k: _median([r.phases[k] for r in ok_f if k in r.phases]) for k in phase_names
        },
        "baseline_send_s": _median([r.send_s for r in ok_b]),
        "baseline_per_s": _median([r.per_s for r in ok_b]),
        "baseline_per_s_range": [
            min((r.per_s for r in ok_b), default=float("nan")),
            max((r.per_s for r in ok_b), default=float("nan")),
        ],
        "baseline_orthanc_cpu_ms_per_instance": _median(
            [r.orthanc_cpu_ms_per_instance for r in ok_b]
        ),
        "target_latency_s": target_latency,
    }
    if ok_f and ok_b:
        ratio = summary["fiona_end_to_end_per_s"] / summary["baseline_per_s"]
        by_round = {r.round: r.per_s for r in ok_b}
        per_round = [r.end_to_end_per_s / by_round[r.round] for r in ok_f if r.round in by_round]
        summary["ratio_end_to_end_to_straight"] = round(ratio, 3)
        summary["ratio_per_round_median"] = _median(per_round)
        summary["ratio_forwarding_only_to_straight"] = round(
            summary["fiona_forwarding_per_s"] / summary["baseline_per_s"], 3
        )
        summary["throughput_target_met"] = ratio >= TARGET_RATIO
        summary["latency_target_met"] = summary["fiona_latency_s_max"] <= target_latency
    spies = [r.spy for r in ok_f if r.spy]
    if spies:
        total: collections.Counter[str] = collections.Counter()
        for s in spies:
            total.update(s)
        summary["spy_samples"] = dict(total.most_common())
    return summary


def print_report(s: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"\n{s['count']} instances, one study, stable_after_seconds {s['stable_after_seconds']}, "
        f"{args.rounds} round(s); FIONA ok {s['fiona_rounds_ok']}, "
        f"straight ok {s['baseline_rounds_ok']}"
    )
    print("| path | send s | inst/s end to end (min-max) | CPU ms/inst |")
    print("|---|---|---|---|")
    lo, hi = s["fiona_end_to_end_per_s_range"]
    print(
        f"| storescu -> FIONA -> Orthanc | {s['fiona_send_s']:.2f} "
        f"({s['fiona_receive_per_s']:.0f} inst/s) | {s['fiona_end_to_end_per_s']:.1f} "
        f"({lo:.1f}-{hi:.1f}) | FIONA {s['fiona_cpu_receive_ms_per_instance']:.2f} receive + "
        f"{s['fiona_cpu_forward_ms_per_instance']:.2f} forward; Orthanc "
        f"{s['orthanc_cpu_ms_per_instance_behind_fiona']:.2f} |"
    )
    lo, hi = s["baseline_per_s_range"]
    print(
        f"| storescu -> Orthanc | {s['baseline_send_s']:.2f} | {s['baseline_per_s']:.1f} "
        f"({lo:.1f}-{hi:.1f}) | Orthanc {s['baseline_orthanc_cpu_ms_per_instance']:.2f} |"
    )
    if "ratio_end_to_end_to_straight" in s:
        print(
            f"\nratio FIONA end to end / straight: {s['ratio_end_to_end_to_straight']:.2f} "
            f"(per-round median {s['ratio_per_round_median']:.2f}); target >= {TARGET_RATIO}: "
            f"{'MET' if s['throughput_target_met'] else 'NOT MET'}"
        )
        print(
            f"latency last ack -> last in Orthanc: median {s['fiona_latency_s']:.2f} s, max "
            f"{s['fiona_latency_s_max']:.2f} s; target <= {s['target_latency_s']:.0f} s: "
            f"{'MET' if s['latency_target_met'] else 'NOT MET'}"
        )
        print(
            f"forwarding part (latency - stable_after): {s['fiona_forwarding_s']:.2f} s = "
            f"{s['fiona_forwarding_per_s']:.1f} inst/s "
            f"({s['ratio_forwarding_only_to_straight']:.2f}x straight)"
        )
    print("\nphases, seconds after the last acknowledgement (medians):")
    for k, v in s["phases_from_last_ack_s"].items():
        print(f"  {k:22s} {v:7.2f}")
    if "spy_samples" in s:
        total = sum(s["spy_samples"].values())
        print(f"\npy-spy --threads, mode {args.spy_mode} ({total} samples at {args.spy_rate} Hz):")
        for name, k in s["spy_samples"].items():
            print(f"  {name:45s} {k:6d}  {k / args.spy_rate:7.2f} thread-s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--count", type=int, default=500, help="instances in the study (default 500)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of (a) and (b) (default 3)")
    p.add_argument(
        "--stable-after",
        type=float,
        default=5.0,
        help="FIONA's stable_after_seconds (default 5)",
    )
    p.add_argument(
        "--poll-seconds",
        type=float,
        default=None,
        help="FIONA's forwarding.poll_seconds (default: FIONA's own, 2)",
    )
    p.add_argument("--json", type=Path, help="write per-round results and the summary here")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="corpus cache folder")
    p.add_argument(
        "--scratch", type=Path, default=OUT / "pipeline-rounds", help="per-round server folders"
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--fiona-src", type=Path, help="run the fiona package in this folder")
    src.add_argument("--fiona-rev", help="run fiona/ exported from this git revision")
    p.add_argument("--spy", type=Path, help="py-spy each FIONA round's forwarding; raw files here")
    p.add_argument("--spy-rate", type=int, default=200, help="py-spy samples/s (default 200)")
    p.add_argument(
        "--spy-mode",
        choices=("idle", "active", "gil"),
        default="idle",
        help="py-spy: every thread's wall time (idle, default), threads not waiting (active) "
        "or the GIL holder (gil)",
    )
    p.add_argument(
        "--batch-size", type=int, help="the destination's batch_size (default: FIONA's, 200)"
    )
    p.add_argument(
        "--max-associations",
        type=int,
        help="the destination's max_associations (default: FIONA's, 2)",
    )
    p.add_argument(
        "--orthanc-pdu",
        type=int,
        help="Orthanc's MaximumPduLength, both paths (default: Orthanc's own, 16384)",
    )
    p.add_argument(
        "--poll-orthanc", type=float, default=0.05, help="Orthanc /statistics poll interval"
    )
    p.add_argument("--send-timeout", type=float, default=600.0, help="kill storescu after this")
    p.add_argument(
        "--forward-timeout",
        type=float,
        default=600.0,
        help="give up waiting for Orthanc this long after the study should be stable",
    )
    p.add_argument("--only", choices=("fiona", "baseline"), help="run one side only")
    p.add_argument("--keep", action="store_true", help="keep the per-round folders")
    args = p.parse_args(argv)
    for tool in (STORESCU, ECHOSCU, ORTHANC):
        if not os.access(tool, os.X_OK):
            p.error(f"{tool} is missing (apt-get install dcmtk orthanc)")
    if args.spy and shutil.which(PY_SPY) is None:
        p.error("--spy needs py-spy (pip install py-spy)")

    prepare_scratch(args.scratch)
    fiona_src: Path | None = args.fiona_src.resolve() if args.fiona_src else None
    fiona_tree = str(fiona_src) if fiona_src else git_state()
    if args.fiona_rev:
        fiona_src, commit = export_rev(args.fiona_rev, args.scratch)
        fiona_tree = f"{commit} (export of {args.fiona_rev})"
    if fiona_src is not None:
        sys.path.insert(0, str(fiona_src))  # routed_request/ledger_facts use the same package
    import fiona

    print(f"fiona: {fiona_tree}, package {Path(fiona.__file__).parent}", file=sys.stderr)
    files, info = make_corpus(args.corpus, args.count)
    files = files[: args.count]
    study_uid = str(info["study_instance_uid"])
    for f in files:  # page cache: both paths read the corpus from memory
        f.read_bytes()
    started = dt.datetime.now(dt.UTC)
    load0 = os.getloadavg()
    fiona_rounds: list[FionaRound] = []
    base_rounds: list[BaselineRound] = []
    sides = ["fiona", "baseline"] if args.only is None else [args.only]
    for rnd in range(1, args.rounds + 1):
        order = sides if rnd % 2 else sides[::-1]
        for side in order:
            if side == "fiona":
                try:
                    fr = run_fiona(rnd, files, study_uid, args, args.scratch, fiona_src)
                except Exception as exc:  # noqa: BLE001 - report it, go on with the next round
                    fr = failed_fiona_round(rnd, len(files), f"{type(exc).__name__}: {exc}")
                fiona_rounds.append(fr)
                print(
                    f"round {rnd} FIONA     send {fr.send_s:6.2f} s ({fr.receive_per_s:5.1f}/s)  "
                    f"latency {fr.latency_s:6.2f} s (forwarding {fr.forwarding_s:5.2f} s)  "
                    f"end to end {fr.end_to_end_s:6.2f} s = {fr.end_to_end_per_s:5.1f}/s  "
                    f"cpu {fr.fiona_cpu_receive_ms_per_instance:.2f}+"
                    f"{fr.fiona_cpu_forward_ms_per_instance:.2f} ms/inst  "
                    f"{'ok' if fr.ok else 'FAILED: ' + '; '.join(fr.problems[:3])}",
                    flush=True,
                )
                print(f"    phases {fr.phases}", flush=True)
            else:
                try:
                    br = run_baseline(rnd, files, args, args.scratch)
                except Exception as exc:  # noqa: BLE001 - report it, go on with the next round
                    br = BaselineRound(rnd, len(files), 0, 0, 0, 0, False, [f"{exc!r}"])
                base_rounds.append(br)
                print(
                    f"round {rnd} straight  send {br.send_s:6.2f} s = {br.per_s:5.1f}/s  "
                    f"orthanc cpu {br.orthanc_cpu_ms_per_instance:.2f} ms/inst  "
                    f"{'ok' if br.ok else 'FAILED: ' + '; '.join(br.problems[:3])}",
                    flush=True,
                )
            os.sync()
    summary = summarise(fiona_rounds, base_rounds, args)
    print_report(summary, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "started_utc": started.isoformat(timespec="seconds"),
                    "command": " ".join([Path(sys.executable).name, *sys.argv]),
                    "fiona_tree": fiona_tree,
                    "machine": {
                        "cpus": os.cpu_count(),
                        "platform": platform.platform(),
                        "python": platform.python_version(),
                        "loadavg_before": load0,
                        "loadavg_after": os.getloadavg(),
                    },
                    "args": {
                        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                    },
                    "summary": summary,
                    "fiona_rounds": [asdict(r) for r in fiona_rounds],
                    "baseline_rounds": [asdict(r) for r in base_rounds],
                },
                indent=2,
            )
            + "\n"
        )
    if args.fiona_rev and fiona_src is not None and not args.keep:
        shutil.rmtree(fiona_src, ignore_errors=True)
    clear_scratch(args.scratch)
    return 0 if all(r.ok for r in fiona_rounds) and all(r.ok for r in base_rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
