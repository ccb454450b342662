#!/usr/bin/env python3
"""Receive benchmark: dcmtk ``storescu`` → dcmtk ``storescp`` / ``fiona serve`` / Orthanc.

Sends the same synthetic CT corpus (default 2,000 instances of 512x512 16-bit, ~0.53 MB
each, one study, synthetic UIDs and names) with ``/usr/bin/storescu`` to each target in
turn, for several rounds, alternating the targets inside every round (the machine is shared
and noisy, so only side-by-side ratios are meaningful). Reports per target the median
instances/s, the ratio to storescp, the server's CPU-ms per instance (utime+stime from
/proc/PID/stat around the transfer) and its peak RSS (VmHWM).

Every target starts fresh per round (empty folder, empty database), is waited for with
C-ECHO, and is stopped after its round (SIGTERM; FIONA must exit 0). Store failures
(``E:`` lines, "Store Failed") and missing instances fail the round. Traffic stays on
127.0.0.1. Every dcmtk tool and Orthanc run with ``TCP_NODELAY=1`` (TESTING.md).

Usage::

    python bench/receive.py --count 2000 --rounds 3
    python bench/receive.py --count 2000 --rounds 3 --parallel 2 --json bench/out/p2.json
    python bench/receive.py --targets fiona --rounds 1 --hold   # for py-spy --pid
    python bench/receive.py --targets fiona --fiona-rev HEAD~1 --rounds 6   # A/B two commits
    python bench/receive.py --scaling --rounds 3   # 1 association on 1 CPU vs N on N CPUs
    python bench/receive.py --object-mb 1500 --rounds 1   # one 1.5 GB multi-frame instance

With ``--scaling`` every target runs twice per round: confined (with the senders) to one CPU
with one association, and on all N CPUs of the benchmark's affinity with N associations (and
N FIONA workers). The gain N-on-N over 1-on-1 is how a server scales with cores when the
senders share the machine: on a two-core machine one association alone already keeps about
one core busy between FIONA and storescu, so "two associations over one" cannot double.

With ``--object-mb`` the corpus is one multi-frame instance of that size (cached in
``bench/out/large``): the peak RSS column shows which servers hold a whole object in memory.

With ``--fiona-rev`` the tree and the other revision are two targets of the same rounds, in
alternating order (round 1: tree first, round 2: the revision first, …): the machine drifts
within a run of several minutes (here the rate fell ~25% over 8 minutes of back-to-back
runs), and whatever runs first in every pair looks faster. Compare them round by round.

The corpus is cached in ``bench/out/corpus`` (gitignored) and reused across runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
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
DEFAULT_CORPUS = OUT / "corpus"
CORPUS_VERSION = 1

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
ORTHANC = "/usr/sbin/Orthanc"
HOST = "127.0.0.1"
ALL_TARGETS = ("storescp", "fiona", "orthanc")

CLK_TCK = os.sysconf("SC_CLK_TCK")


def dcmtk_env() -> dict[str, str]:
    """Nagle off for dcmtk and Orthanc (TESTING.md: ~20 instances/s otherwise)."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


RECENTLY_DELETED_SECONDS = 31
"""ext4 without a journal skips, for each new file, every inode deleted in the last 30 s
(300 s while the inode table block is dirty): see :func:`retire_round_folder`."""

RETIRED = ".retired"
"""Where finished rounds' folders wait (in the scratch folder) until the run ends."""


def ext4_without_journal(path: Path) -> bool:
    """Whether `path` is on an ext4 filesystem that has no journal (this machine's root)."""
    st = os.stat(path)
    try:
        uevent = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/uevent")
        name = dict(line.split("=", 1) for line in uevent.read_text().splitlines() if "=" in line)[
            "DEVNAME"
        ]
        return Path(f"/sys/fs/ext4/{name}/journal_task").read_text().strip() == "<none>"
    except (OSError, KeyError):
        return False


def prepare_scratch(scratch: Path) -> None:
    """Create the scratch folder; clear what an earlier run left, and let it age.

    Round folders are not deleted while a run goes on (:func:`retire_round_folder`): on ext4
    without a journal (this machine's root filesystem) the inode allocator passes over every
    inode deleted in the last 30 s (``recently_deleted``), rereading its inode table block,
    once per new file. Right after a round's 2,000 files were deleted, the next target's
    files cost 0.3-0.5 ms more kernel CPU each (perf: ``ext4_create`` ~20% of the samples),
    whichever target that is. Leftovers of an earlier run are deleted here, synced (the
    window is 30 s once the inode table blocks are clean, 300 s before) and left to age.
    """
    scratch.mkdir(parents=True, exist_ok=True)
    leftovers = list(scratch.iterdir())
    for folder in leftovers:
        shutil.rmtree(folder, ignore_errors=True)
    os.sync()
    marker = scratch.parent / f".{scratch.name}-cleared"  # when the last run cleared up
    last = marker.stat().st_mtime if marker.exists() else 0.0
    if (leftovers or time.time() - last < RECENTLY_DELETED_SECONDS) and ext4_without_journal(
        scratch
    ):
        wait = RECENTLY_DELETED_SECONDS - (0 if leftovers else time.time() - last)
        print(f"letting deleted inodes age for {wait:.0f} s (ext4 without a journal)")
        time.sleep(max(0.0, wait))


def retire_round_folder(folder: Path) -> None:
    """Set a finished round's folder aside until the run ends (see :func:`prepare_scratch`)."""
    retired = folder.parent / RETIRED
    retired.mkdir(exist_ok=True)
    folder.rename(retired / folder.name)


def clear_scratch(scratch: Path) -> None:
    """Delete the run's retired round folders (the next run lets them age)."""
    shutil.rmtree(scratch / RETIRED, ignore_errors=True)
    os.sync()
    (scratch.parent / f".{scratch.name}-cleared").touch()


# -- corpus -----------------------------------------------------------------------------


def make_large_object(folder: Path, megabytes: int) -> Path:
    """Create (or reuse) one multi-frame secondary-capture instance (RGB frames of 512x512)
    with about `megabytes` MB of pixel data."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        MultiFrameTrueColorSecondaryCaptureImageStorage,
        generate_uid,
    )

    path = folder / f"multiframe-{megabytes}MB.dcm"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    print(f"generating a {megabytes} MB multi-frame instance in {path} ...", file=sys.stderr)
    frame = np.random.default_rng(20240601).integers(0, 256, size=(512, 512, 3), dtype=np.uint8)
    frames = max(1, megabytes * 2**20 // frame.nbytes)
    sop_uid = generate_uid("2.25.")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MultiFrameTrueColorSecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MultiFrameTrueColorSecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid("2.25.")
    ds.SeriesInstanceUID = generate_uid("2.25.")
    ds.Modality = "OT"
    ds.PatientName = "BENCH^SYNTHETIC"
    ds.PatientID = "BENCH0002"
    ds.StudyDate = "20240101"
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.NumberOfFrames = frames
    ds.Rows = 512
    ds.Columns = 512
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = frame.tobytes() * frames
    partial = path.with_suffix(".partial")
    ds.save_as(partial, enforce_file_format=True)
    partial.rename(path)
    return path


def make_corpus(folder: Path, count: int) -> list[Path]:
    """Create (or reuse) `count` synthetic CT instances in `folder`; return their paths."""
    marker = folder.with_name(folder.name + ".json")  # outside, so `+sd DIR` sends only DICOM
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("version") == CORPUS_VERSION and info.get("count", 0) >= count:
            files = [folder / name for name in info["files"][:count]]
            if all(p.exists() for p in files):
                return files
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    print(f"generating {count} synthetic CT instances in {folder} ...", file=sys.stderr)
    rng = np.random.default_rng(20240601)
    base = rng.integers(0, 4096, size=(512, 512), dtype=np.uint16)
    prefix = "2.25."  # UUID-derived UIDs: synthetic, never clash with real ones
    study_uid = generate_uid(prefix)
    series_uid = generate_uid(prefix)
    frame_uid = generate_uid(prefix)
    names = []
    t0 = time.monotonic()
    for i in range(count):
        sop_uid = generate_uid(prefix)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = "1.2.826.0.1.3680043.10.1338.1"
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = "CT"
        ds.PatientName = "BENCH^SYNTHETIC"
        ds.PatientID = "BENCH0001"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyDate = "20240101"
        ds.StudyTime = "120000"
        ds.SeriesDate = "20240101"
        ds.SeriesTime = "120000"
        ds.AccessionNumber = "BENCH1"
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = i + 1
        ds.StudyDescription = "FIONA receive benchmark (synthetic)"
        ds.SeriesDescription = "synthetic CT"
        ds.Manufacturer = "SYNTHETIC"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-250.0, -250.0, -1.0 * i]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.SliceThickness = 1.0
        ds.PixelSpacing = [0.976562, 0.976562]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = 512
        ds.Columns = 512
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        pixels = np.roll(base, i * 7, axis=0)
        ds.PixelData = pixels.tobytes()
        name = f"CT{i + 1:06d}.dcm"
        ds.save_as(folder / name, enforce_file_format=True)
        names.append(name)
    marker.write_text(
        json.dumps(
            {
                "version": CORPUS_VERSION,
                "count": count,
                "study_instance_uid": study_uid,
                "files": names,
            }
        )
    )
    print(f"corpus ready in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return [folder / n for n in names]


# -- process helpers ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def process_tree(pid: int) -> list[int]:
    """`pid` and its live children (FIONA's worker processes)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            children = [int(c) for c in fh.read().split()]
    except OSError:
        children = []
    return [pid, *children]


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) seconds of a process and its live children (all threads, plus
    reaped children)."""
    user = system = 0
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is state (field 3); utime, stime, cutime, cstime are fields 14-17.
        user += int(fields[11]) + int(fields[13])
        system += int(fields[12]) + int(fields[14])
    return user / CLK_TCK, system / CLK_TCK


def peak_rss_mb(pid: int) -> float:
    """Sum of the peak RSS (VmHWM) of a process and its live children."""
    total = 0.0
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) / 1024
        except OSError:
            continue
    return total if total else float("nan")


def wait_echo(port: int, called: str, proc: subprocess.Popen[Any], timeout: float) -> None:
    """Wait until the server answers C-ECHO.

    Only echoscu probes the port: a bare TCP connect-and-close would leave pynetdicom (and
    so FIONA) holding an association thread until its ACSE timeout, delaying its stop.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with {proc.returncode}")
        r = subprocess.run(
            [ECHOSCU, "-aet", "BENCH", "-aec", called, "-to", "5", "-ta", "5", HOST, str(port)],
            env=dcmtk_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        if r.returncode == 0 and "E:" not in r.stdout + r.stderr:
            return
        time.sleep(0.1)
    raise RuntimeError(f"no C-ECHO answer on port {port} after {timeout} s")


def stop_process(proc: subprocess.Popen[Any], timeout: float = 60.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return -9
    return int(proc.returncode)


# -- targets ------------------------------------------------------------------------------


class Target:
    """One receiving server, started fresh for a round in `workdir`."""

    name = ""
    called_ae = "ANY-SCP"

    def __init__(self, workdir: Path, args: argparse.Namespace) -> None:
        self.workdir = workdir
        self.args = args
        self.port = free_port()
        self.proc: subprocess.Popen[Any] | None = None
        self.log = open(workdir / f"{self.name}.log", "wb")  # noqa: SIM115 - closed in stop()

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dcmtk_env()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.command(),
            cwd=self.workdir,
            env=self.env(),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_echo(self.port, self.called_ae, self.proc, timeout=60)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def received(self) -> int:
        raise NotImplementedError

    def stop(self) -> int:
        assert self.proc is not None
        code = stop_process(self.proc)
        self.log.close()
        return code

    def stop_ok(self, code: int) -> bool:
        return code in (0, -signal.SIGTERM)


class StoreSCP(Target):
    name = "storescp"
    called_ae = "STORESCP"

    def command(self) -> list[str]:
        self.outdir = self.workdir / "received"
        self.outdir.mkdir()
        # One process serves one association at a time: fork one per association when
        # the corpus is sent over several (CPU of the reaped children is counted).
        fork = ["--fork"] if self.args.parallel > 1 else []
        return [STORESCP, *fork, "-aet", self.called_ae, "-od", str(self.outdir), str(self.port)]

    def received(self) -> int:
        return sum(1 for p in self.outdir.rglob("*") if p.is_file())


class Fiona(Target):
    name = "fiona"
    called_ae = "FIONA"

    def command(self) -> list[str]:
        self.config = self.workdir / "fiona.yaml"
        spool = self.workdir / "spool"
        self.config.write_text(
            "node:\n"
            f"  ae_title: {self.called_ae}\n"
            f"  host: {HOST}\n"
            f"  port: {self.port}\n"
            f"  maximum_pdu_size: {self.args.fiona_pdu}\n"
            f"  workers: {self.args.fiona_workers}\n"
            "storage:\n"
            f"  path: {spool}\n"
            "  min_free_mb: 512\n"
            "database:\n"
            f'  url: "sqlite:///{self.workdir / "fiona.db"}"\n'
            "stable_after_seconds: 600\n"
            "logging:\n"
            "  level: INFO\n"
        )
        return [sys.executable, "-m", "fiona", "serve", "--config", str(self.config)]

    def env(self) -> dict[str, str]:
        env = dcmtk_env()
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self) -> None:
        super().start()
        # C-ECHO reached one process; wait until every worker listens too.
        deadline = time.monotonic() + 60
        log = self.workdir / f"{self.name}.log"
        while log.read_text().count('"event": "listening"') < self.args.fiona_workers:
            if time.monotonic() > deadline:
                raise RuntimeError("FIONA workers did not start")
            time.sleep(0.1)

    def received(self) -> int:
        r = subprocess.run(
            [sys.executable, "-m", "fiona", "status", "--json", "--config", str(self.config)],
            capture_output=True,
            text=True,
            timeout=120,
            env=self.env(),
        )
        if r.returncode != 0:
            raise RuntimeError(f"fiona status failed: {r.stderr[-500:]}")
        report = json.loads(r.stdout)
        self.quarantined = int(report.get("quarantined", 0))
        return int(report["instances"])

    def stop_ok(self, code: int) -> bool:
        return code == 0  # FIONA finishes its work on SIGTERM and exits 0


class Orthanc(Target):
    name = "orthanc"
    called_ae = "ORTHANC"

    def command(self) -> list[str]:
        self.http_port = free_port()
        storage = self.workdir / "orthanc-db"
        storage.mkdir()
        config = {
            "Name": "bench",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.called_ae,
            "DicomPort": self.port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {},
            "OrthancPeers": {},
            "SaveJobs": False,
            "WebDavEnabled": False,
        }
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config, indent=1))
        return [ORTHANC, str(path)]

    def received(self) -> int:
        url = f"http://{HOST}:{self.http_port}/statistics"
        with urllib.request.urlopen(url, timeout=30) as resp:
            return int(json.load(resp)["CountInstances"])


class FionaAt(Fiona):
    """FIONA exported at another revision (``--fiona-rev``), run side by side with the tree."""

    def env(self) -> dict[str, str]:
        env = super().env()
        env["PYTHONPATH"] = os.pathsep.join(
            [str(self.args.fiona_rev_src), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        return env


TARGETS: dict[str, type[Target]] = {"storescp": StoreSCP, "fiona": Fiona, "orthanc": Orthanc}


def target_class(name: str) -> type[Target]:
    """The target of a name: ``fiona@COMMIT`` is the ``--fiona-rev`` export."""
    return FionaAt if name.startswith("fiona@") else TARGETS[name]


# -- sending ---------------------------------------------------------------------------------


@dataclass
class SendResult:
    wall_s: float  # first storescu start → last storescu exit
    assoc_s: float  # first "Requesting Association" → last "Releasing Association"
    errors: list[str] = field(default_factory=list)
    client_cpu_s: float = 0.0
    sent: int = 0


def _reader(stream: Any, sink: list[tuple[float, str]]) -> None:
    for raw in iter(stream.readline, b""):
        sink.append((time.monotonic(), raw.decode("utf-8", "replace").rstrip()))


def send(files: list[Path], port: int, called_ae: str, parallel: int, timeout: float) -> SendResult:
    """Send `files` with `parallel` storescu processes (one association each)."""
    chunks = [files[i::parallel] for i in range(parallel)]
    procs = []
    lines: list[list[tuple[float, str]]] = []
    threads = []
    ru0 = os.times()
    t0 = time.monotonic()
    for chunk in chunks:
        cmd = [
            STORESCU,
            "-v",
            "-aet",
            "BENCH",
            "-aec",
            called_ae,
            "-nh",
            "-to",
            "10",
            "-ta",
            "30",
            "-td",
            "60",
            HOST,
            str(port),
            *map(str, chunk),
        ]
        proc = subprocess.Popen(
            cmd, env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        sink: list[tuple[float, str]] = []
        th = threading.Thread(target=_reader, args=(proc.stdout, sink), daemon=True)
        th.start()
        procs.append(proc)
        lines.append(sink)
        threads.append(th)
    deadline = t0 + timeout
    errors: list[str] = []
    for proc in procs:
        try:
            proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            errors.append(f"storescu killed after {timeout} s")
        if proc.returncode != 0:
            errors.append(f"storescu exit status {proc.returncode}")
    t1 = time.monotonic()
    ru1 = os.times()
    for th in threads:
        th.join(10)
    starts, ends, sent = [], [], 0
    for sink in lines:
        for ts, text in sink:
            if "Requesting Association" in text:
                starts.append(ts)
            elif "Releasing Association" in text:
                ends.append(ts)
            elif "Received Store Response (Success)" in text:
                sent += 1
            if text.startswith(("E:", "F:")) or "Store Failed" in text:
                errors.append(text)
    assoc_s = (max(ends) - min(starts)) if starts and len(ends) == len(procs) else t1 - t0
    client_cpu = (ru1.children_user + ru1.children_system) - (
        ru0.children_user + ru0.children_system
    )
    return SendResult(t1 - t0, assoc_s, errors[:20], client_cpu, sent)


# -- a round -------------------------------------------------------------------------------


@dataclass
class RoundResult:
    target: str
    round: int
    count: int
    parallel: int
    wall_s: float
    assoc_s: float
    instances_per_s: float
    mb_per_s: float
    server_cpu_ms_per_instance: float
    server_user_ms_per_instance: float
    server_sys_ms_per_instance: float
    server_peak_rss_mb: float
    client_cpu_ms_per_instance: float
    received: int
    stop_code: int
    startup_s: float
    stop_s: float
    ok: bool
    problems: list[str]
    cpus: int = 0  # CPUs the server and senders were confined to (0: not confined)


def run_round(
    name: str,
    rnd: int,
    files: list[Path],
    args: argparse.Namespace,
    scratch: Path,
    label: str | None = None,
    cpus: int = 0,
) -> RoundResult:
    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-r{rnd}-", dir=scratch))
    target = target_class(name)(workdir, args)
    problems: list[str] = []
    t_start = time.monotonic()
    target.start()
    startup_s = time.monotonic() - t_start
    try:
        if args.hold:
            print(
                f"[hold] {name} pid {target.pid} port {target.port}; sending in {args.hold} s",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(args.hold)
        cpu0 = cpu_times(target.pid)
        result = send(files, target.port, target.called_ae, args.parallel, args.send_timeout)
        if name == "storescp" and args.parallel > 1:
            # storescp --fork reaps its children (whose CPU then counts in its cutime and
            # cstime) when it accepts the next association: send one C-ECHO.
            time.sleep(0.2)
            wait_echo(target.port, target.called_ae, target.proc, timeout=30)
            time.sleep(0.3)
        cpu1 = cpu_times(target.pid)
        rss = peak_rss_mb(target.pid)
        if name == "orthanc":
            received = target.received()
    finally:
        t_stop = time.monotonic()
        code = target.stop()
        stop_s = time.monotonic() - t_stop
    if name != "orthanc":
        received = target.received()
    problems.extend(result.errors)
    if received != len(files):
        problems.append(f"received {received} of {len(files)}")
    if result.sent != len(files):
        problems.append(f"storescu reported {result.sent} successful stores of {len(files)}")
    if getattr(target, "quarantined", 0):
        problems.append(f"{target.quarantined} quarantined")
    if not target.stop_ok(code):
        problems.append(f"server exit status {code}")
    n = len(files)
    rr = RoundResult(
        target=label or name,
        round=rnd,
        count=n,
        parallel=args.parallel,
        cpus=cpus,
        wall_s=round(result.wall_s, 3),
        assoc_s=round(result.assoc_s, 3),
        instances_per_s=round(n / result.assoc_s, 1),
        mb_per_s=round(sum(f.stat().st_size for f in files) / 2**20 / result.assoc_s, 1),
        server_cpu_ms_per_instance=round((sum(cpu1) - sum(cpu0)) * 1000 / n, 2),
        server_user_ms_per_instance=round((cpu1[0] - cpu0[0]) * 1000 / n, 2),
        server_sys_ms_per_instance=round((cpu1[1] - cpu0[1]) * 1000 / n, 2),
        server_peak_rss_mb=round(rss, 1),
        client_cpu_ms_per_instance=round(result.client_cpu_s * 1000 / n, 2),
        received=received,
        stop_code=code,
        startup_s=round(startup_s, 2),
        stop_s=round(stop_s, 2),
        ok=not problems,
        problems=problems,
    )
    if args.keep:
        print(f"  kept {workdir}", file=sys.stderr)
    elif args.retire:
        retire_round_folder(workdir)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    os.sync()  # flush this round's writes before the next target is timed
    return rr


def baseline_of(label: str) -> str:
    """The storescp label a target's rate is compared with (same CPU set with --scaling)."""
    _, sep, config = label.partition("/")
    return f"storescp{sep}{config}"


def summarise(results: list[RoundResult], targets: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name in targets:
        mine = [r for r in results if r.target == name and r.ok]
        if not mine:
            rows.append({"target": name, "rounds_ok": 0})
            continue
        rates = [r.instances_per_s for r in mine]
        row: dict[str, Any] = {
            "target": name,
            "rounds_ok": len(mine),
            "rounds": len([r for r in results if r.target == name]),
            "median_instances_per_s": round(statistics.median(rates), 1),
            "min_instances_per_s": min(rates),
            "max_instances_per_s": max(rates),
            "median_mb_per_s": round(statistics.median(r.mb_per_s for r in mine), 1),
            "median_server_cpu_ms_per_instance": round(
                statistics.median(r.server_cpu_ms_per_instance for r in mine), 2
            ),
            "median_server_user_ms_per_instance": round(
                statistics.median(r.server_user_ms_per_instance for r in mine), 2
            ),
            "median_server_sys_ms_per_instance": round(
                statistics.median(r.server_sys_ms_per_instance for r in mine), 2
            ),
            "max_server_peak_rss_mb": max(r.server_peak_rss_mb for r in mine),
        }
        rows.append(row)
    # Ratio of medians, and the median of the per-round ratios (same round, side by side).
    medians = {row["target"]: row.get("median_instances_per_s") for row in rows}
    for row in rows:
        base_label = baseline_of(row["target"])
        base = medians.get(base_label)
        scp = {r.round: r.instances_per_s for r in results if r.target == base_label and r.ok}
        if base and "median_instances_per_s" in row:
            row["ratio_to_storescp"] = round(row["median_instances_per_s"] / base, 2)
            per_round = [
                r.instances_per_s / scp[r.round]
                for r in results
                if r.target == row["target"] and r.ok and r.round in scp
            ]
            if per_round:
                row["median_round_ratio_to_storescp"] = round(statistics.median(per_round), 2)
    return rows


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    shape = (
        "target/Kcpu: K associations on K CPUs"
        if args.scaling
        else f"{args.parallel} association(s)"
    )
    print(f"\n{args.count} instances, {shape}, {args.rounds} round(s)")
    print(
        "| target | inst/s median (min-max) | MB/s | x storescp (per-round median) | "
        "server CPU ms/inst (user+sys) | server peak RSS MB | rounds ok |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if not r.get("rounds_ok"):
            print(f"| {r['target']} | failed | | | | | 0 |")
            continue
        ratio = r.get("ratio_to_storescp")
        ratio_s = (
            f"{ratio:.2f} ({r.get('median_round_ratio_to_storescp', 0):.2f})"
            if ratio is not None
            else "-"
        )
        print(
            f"| {r['target']} | {r['median_instances_per_s']:.0f} "
            f"({r['min_instances_per_s']:.0f}-{r['max_instances_per_s']:.0f}) | "
            f"{r['median_mb_per_s']:.0f} | {ratio_s} | "
            f"{r['median_server_cpu_ms_per_instance']:.2f} "
            f"({r['median_server_user_ms_per_instance']:.1f}+"
            f"{r['median_server_sys_ms_per_instance']:.1f}) | "
            f"{r['max_server_peak_rss_mb']:.0f} | {r['rounds_ok']}/{r['rounds']} |"
        )


def scaling_gains(results: list[RoundResult], names: list[str], n: int) -> str:
    """Per target: the rate on n CPUs (n associations) over one CPU (one), round by round."""
    lines = [f"\nScaling, {n} associations on {n} CPUs over 1 association on 1 CPU:"]
    for name in names:
        one = {r.round: r for r in results if r.target == f"{name}/1cpu" and r.ok}
        many = {r.round: r for r in results if r.target == f"{name}/{n}cpu" and r.ok}
        gains = [
            many[k].instances_per_s / one[k].instances_per_s
            for k in sorted(one.keys() & many.keys())
        ]
        if not gains:
            lines.append(f"- {name}: no round where both passed")
            continue
        shown = ", ".join(f"{g:.2f}" for g in gains)
        lines.append(f"- {name}: {statistics.median(gains):.2f}x (per round {shown})")
    return "\n".join(lines)


def git_state() -> str:
    """The commit measured, and whether fiona/ (or its profiles in rules/) had changes."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "fiona", "rules"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head}{' (fiona/ modified)' if dirty else ''}"


def export_rev(rev: str, into: Path) -> tuple[Path, str]:
    """``git archive`` of ``fiona/`` at *rev* into a temporary folder; it and the commit."""
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", f"{rev}^{{commit}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    into.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="fiona-src-", dir=into))
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", commit, "fiona"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder, commit


def compare_revisions(results: list[RoundResult], against: str, mine_label: str = "fiona") -> str:
    """FIONA's rate over the other revision's, round by round (the two ran side by side)."""
    mine = {r.round: r for r in results if r.target == mine_label and r.ok}
    other = {r.round: r for r in results if r.target == against and r.ok}
    pairs = [(mine[k], other[k]) for k in sorted(mine.keys() & other.keys())]
    if not pairs:
        return f"fiona / {against}: no round where both passed"
    rates = [a.instances_per_s / b.instances_per_s for a, b in pairs]
    cpu = [
        a.server_cpu_ms_per_instance / b.server_cpu_ms_per_instance
        for a, b in pairs
        if b.server_cpu_ms_per_instance
    ]
    shown = ", ".join(f"{x:.2f}" for x in rates)
    return (
        f"fiona / {against}, round by round: inst/s {shown} (median "
        f"{statistics.median(rates):.2f}); CPU per instance median "
        f"{statistics.median(cpu) if cpu else float('nan'):.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--count", type=int, default=2000, help="instances to send (default 2000)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per target (default 3)")
    p.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="storescu processes (associations) splitting the corpus",
    )
    p.add_argument(
        "--targets",
        default=",".join(ALL_TARGETS),
        help=f"comma-separated subset of {','.join(ALL_TARGETS)}",
    )
    p.add_argument("--json", type=Path, help="write per-round results and summary here")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="corpus cache folder")
    p.add_argument(
        "--scratch",
        type=Path,
        default=OUT / "rounds",
        help="parent of the per-round server folders (deleted when the run ends)",
    )
    p.add_argument(
        "--fiona-pdu",
        type=int,
        default=1048576,
        help="FIONA node.maximum_pdu_size (default 1048576, FIONA's default)",
    )
    p.add_argument(
        "--fiona-workers",
        type=int,
        default=1,
        help="FIONA node.workers: receiving processes sharing the port (default 1)",
    )
    p.add_argument(
        "--send-timeout",
        type=float,
        default=900.0,
        help="kill storescu after this many seconds (bounded runtime)",
    )
    p.add_argument(
        "--fiona-rev",
        help="also run FIONA exported at this git revision (target fiona@COMMIT), side by "
        "side with the tree in every round, and report the rates round by round",
    )
    p.add_argument(
        "--scaling",
        action="store_true",
        help="run every target twice per round, on 1 CPU with 1 association and on all N "
        "CPUs with N associations (and N FIONA workers), and report the gain",
    )
    p.add_argument(
        "--object-mb",
        type=int,
        help="send one multi-frame instance of this many MB instead of the CT corpus "
        "(peak memory against object size; --count is ignored)",
    )
    p.add_argument("--keep", action="store_true", help="keep the per-round server folders")
    p.add_argument(
        "--hold",
        type=float,
        default=0.0,
        help="seconds to wait after a server is up before sending (to attach a "
        "profiler to the printed pid)",
    )
    args = p.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        p.error(f"unknown targets {unknown}; choose from {ALL_TARGETS}")
    if args.object_mb and (args.scaling or args.parallel != 1):
        p.error("--object-mb sends one instance over one association")
    if args.scaling and (args.parallel != 1 or args.fiona_workers != 1):
        p.error("--scaling sets the associations and workers itself")
    if args.parallel < 1 or args.count < args.parallel:
        p.error("--parallel must be >= 1 and <= --count")
    for tool in (
        (STORESCU, ECHOSCU)
        + ((STORESCP,) if "storescp" in targets else ())
        + ((ORTHANC,) if "orthanc" in targets else ())
    ):
        if not os.access(tool, os.X_OK):
            p.error(f"{tool} is missing (apt-get install dcmtk orthanc)")

    if args.object_mb:
        files = [make_large_object(OUT / "large", args.object_mb)]
        args.count = 1
    else:
        files = make_corpus(args.corpus, args.count)
    prepare_scratch(args.scratch)
    against = None
    if args.fiona_rev:
        args.fiona_rev_src, commit = export_rev(args.fiona_rev, args.scratch / ".src")
        against = f"fiona@{commit}"
        targets = [*targets, against] if "fiona" in targets else [*targets, "fiona", against]
    # Every round's folder is kept until the run ends, if the disk has room for them all.
    need = sum(f.stat().st_size for f in files) * args.rounds * len(targets)
    args.retire = shutil.disk_usage(args.scratch).free > need * 1.2 + (2 << 30)
    if not args.retire:
        print(
            f"not enough free disk to keep every round ({need >> 20} MB): each round's folder "
            "is deleted before the next round, which may slow the next target's files down "
            "on ext4 without a journal (see prepare_scratch)",
            file=sys.stderr,
        )
    # Warm the page cache so that every target reads the corpus from memory.
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 20):
                pass
    started = dt.datetime.now(dt.UTC)
    results: list[RoundResult] = []
    # Each run of a target: its name, label, arguments and the CPUs it is confined to.
    all_cpus = sorted(os.sched_getaffinity(0))
    runs: list[tuple[str, str, argparse.Namespace, list[int]]] = []
    for name in targets:
        if not args.scaling:
            runs.append((name, name, args, all_cpus))
            continue
        for cpus in (all_cpus[:1], all_cpus):
            k = len(cpus)
            variant = argparse.Namespace(**{**vars(args), "parallel": k, "fiona_workers": k})
            runs.append((name, f"{name}/{k}cpu", variant, cpus))
    labels = [label for _, label, _, _ in runs]
    for rnd in range(1, args.rounds + 1):
        # Rotate the order so that no target always runs first (or after the same one).
        k = (rnd - 1) % len(runs)
        order = runs[k:] + runs[:k]
        for name, label, run_args, cpus in order:
            # The server, its workers and the senders inherit the benchmark's affinity.
            os.sched_setaffinity(0, cpus)
            try:
                rr = run_round(
                    name,
                    rnd,
                    files,
                    run_args,
                    args.scratch,
                    label=label,
                    cpus=len(cpus) if args.scaling else 0,
                )
            except Exception as exc:  # noqa: BLE001 - report and go on with the next one
                zero = dict.fromkeys(
                    (
                        "wall_s",
                        "assoc_s",
                        "instances_per_s",
                        "mb_per_s",
                        "server_cpu_ms_per_instance",
                        "server_user_ms_per_instance",
                        "server_sys_ms_per_instance",
                        "server_peak_rss_mb",
                        "client_cpu_ms_per_instance",
                        "startup_s",
                        "stop_s",
                    ),
                    0.0,
                )
                rr = RoundResult(
                    target=label,
                    round=rnd,
                    count=len(files),
                    parallel=run_args.parallel,
                    received=0,
                    stop_code=-1,
                    ok=False,
                    problems=[f"{type(exc).__name__}: {exc}"],
                    **zero,
                )
            finally:
                os.sched_setaffinity(0, all_cpus)
            results.append(rr)
            status = "ok" if rr.ok else "FAILED: " + "; ".join(rr.problems[:3])
            print(
                f"round {rnd} {label:9s} {rr.instances_per_s:7.1f} inst/s "
                f"{rr.mb_per_s:6.1f} MB/s  "
                f"assoc {rr.assoc_s:6.2f} s wall {rr.wall_s:6.2f} s  "
                f"cpu {rr.server_cpu_ms_per_instance:5.2f} ms/inst  "
                f"rss {rr.server_peak_rss_mb:6.1f} MB  up {rr.startup_s:.1f} s "
                f"stop {rr.stop_s:.1f} s  {status}",
                flush=True,
            )
    clear_scratch(args.scratch)
    if args.fiona_rev:
        shutil.rmtree(args.scratch / ".src", ignore_errors=True)
    rows = summarise(results, labels)
    print_table(rows, args)
    if args.scaling:
        print(scaling_gains(results, targets, len(all_cpus)))
    if against is not None and args.scaling:
        for k in sorted({1, len(all_cpus)}):
            print(compare_revisions(results, f"{against}/{k}cpu", f"fiona/{k}cpu"))
    elif against is not None:
        print(compare_revisions(results, against))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "started_utc": started.isoformat(timespec="seconds"),
                    "command": " ".join([Path(sys.executable).name, *sys.argv]),
                    "fiona_tree": git_state(),
                    "against": against,
                    "machine": {
                        "cpus": os.cpu_count(),
                        "platform": platform.platform(),
                        "python": platform.python_version(),
                    },
                    "args": {
                        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                    },
                    "summary": rows,
                    "rounds": [asdict(r) for r in results],
                },
                indent=2,
            )
            + "\n"
        )
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
