"""Worker process management: spawn, watch, heartbeat, replace with backoff, stop.

Gunicorn's arbiter is the model: workers are separate processes started with exec (never
a plain fork: gRPC state is not fork-safe); a worker that exits with the boot-error code
stops the whole process instead of crash-looping; a worker that stops heartbeating is
killed and replaced; a replacement never disturbs the other workers' connections.

In shared (in-pod) mode each worker also gets an fd channel (`ztunnel.fdchannel`): a
SOCK_SEQPACKET socketpair whose worker end is inherited as `--fd-channel <fd>`. The
supervisor's end is kept on the slot and handed to `on_worker_started`, which owns it from
then on (the pod manager reads it until the worker is gone, then closes it) and replays
every running pod to the new worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from ztunnel import fdchannel
from ztunnel.core import ipc
from ztunnel.supervisor.aggregate import WorkerMetricsCollector
from ztunnel.supervisor.channel import StateChannel

log = logging.getLogger(__name__)

HEARTBEAT_TIMEOUT = 10.0  # seconds without an Ack before a worker is killed
SNAPSHOT_LAG = 2.0  # a worker behind the current seq this long gets a fresh snapshot
RESTART_BACKOFF_INITIAL = 0.5
RESTART_BACKOFF_MAX = 30.0
HEALTHY_AFTER = 30.0  # a worker up this long resets its restart backoff
# glibc hands >=128 KiB buffers to mmap/munmap otherwise: page faults cost ~2x bulk throughput.
GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=134217728"


@dataclass(slots=True, eq=False)
class WorkerSlot:
    index: int
    proc: asyncio.subprocess.Process | None = None
    identity: bytes | None = None
    acked_seq: int = -1
    listening: bool = False
    started_at: float = 0.0
    last_seen: float = 0.0
    behind_since: float | None = None
    backoff: float = RESTART_BACKOFF_INITIAL
    restarts: int = 0
    channel: socket.socket | None = None  # supervisor end of the fd channel (shared mode)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None


class Arbiter:
    def __init__(
        self,
        count: int,
        *,
        runtime_dir: str,
        channel: StateChannel,
        snapshot: Callable[[], ipc.Snapshot],
        collector: WorkerMetricsCollector,
        on_fatal: Callable[[str], None],
        on_progress: Callable[[], None] = lambda: None,
        on_demand: Callable[[bytes, ipc.OnDemandRequest], None] | None = None,
        fd_channels: bool = False,
        on_worker_started: Callable[[WorkerSlot], None] | None = None,
    ) -> None:
        self.slots = [WorkerSlot(i) for i in range(count)]
        self.runtime_dir = runtime_dir
        self.channel = channel
        self.snapshot = snapshot
        self.collector = collector
        self.on_fatal = on_fatal
        self.on_progress = on_progress  # acks and exits change readiness
        self.on_demand = on_demand  # XDS_ON_DEMAND lookups asked by workers
        self.fd_channels = fd_channels
        self.on_worker_started = on_worker_started or _close_channel
        self.stopping = False
        self._tasks: set[asyncio.Task[None]] = set()

    # -- spawning -------------------------------------------------------------------------------

    async def start(self) -> None:
        for slot in self.slots:
            await self._spawn(slot)
        self._keep(self._recv_loop(), "worker-control")
        self._keep(self._monitor(), "worker-monitor")

    async def _spawn(self, slot: WorkerSlot) -> None:
        env = dict(os.environ)
        env.setdefault("GLIBC_TUNABLES", GLIBC_TUNABLES)
        args = ("-m", "workers", "--index", str(slot.index), "--runtime-dir", self.runtime_dir)
        if not self.fd_channels:
            slot.proc = await asyncio.create_subprocess_exec(sys.executable, *args, env=env)
        else:
            parent, child = fdchannel.pair()
            try:
                slot.proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    *args,
                    "--fd-channel",
                    str(child.fileno()),
                    env=env,
                    pass_fds=(child.fileno(),),  # inheritable in the worker only
                )
            except BaseException:
                parent.close()
                raise
            finally:
                child.close()  # the worker holds its own copy now
            slot.channel = parent
        slot.identity, slot.acked_seq, slot.listening = None, -1, False
        slot.started_at = slot.last_seen = time.monotonic()
        slot.behind_since = None
        log.info("started worker %d (pid %d)", slot.index, slot.proc.pid)
        self._keep(self._watch(slot, slot.proc), f"watch-worker-{slot.index}")
        if slot.channel is not None:
            self.on_worker_started(slot)

    async def _watch(self, slot: WorkerSlot, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if slot.identity is not None:
            self.collector.forget_worker(slot.identity.decode())
        slot.listening = False
        self.on_progress()
        if self.stopping:
            log.info("worker %d (pid %d) exited with %d", slot.index, proc.pid, code)
            return
        if code in (ipc.EXIT_BOOT_ERROR, ipc.EXIT_SCHEMA_MISMATCH):
            self.on_fatal(f"worker {slot.index} failed to start (exit {code})")
            return
        log.warning(
            "worker %d (pid %d) died with %s; restarting in %.1fs",
            slot.index,
            proc.pid,
            _status(code),
            slot.backoff,
        )
        await asyncio.sleep(slot.backoff)
        if self.stopping:
            return
        healthy = time.monotonic() - slot.started_at > HEALTHY_AFTER
        slot.backoff = (
            RESTART_BACKOFF_INITIAL if healthy else min(slot.backoff * 2, RESTART_BACKOFF_MAX)
        )
        slot.restarts += 1
        await self._spawn(slot)

    def _keep(self, coro: object, name: str) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("supervisor task %s failed", task.get_name(), exc_info=task.exception())

    # -- control channel ----------------------------------------------------------------------

    async def _recv_loop(self) -> None:
        while True:
            identity, msg = await self.channel.recv()
            self.on_message(identity, msg)

    def on_message(self, identity: bytes, msg: ipc.FromWorker) -> None:
        if isinstance(msg, ipc.Hello):
            self._on_hello(identity, msg)
            return
        slot = self._slot_by_identity(identity)
        if isinstance(msg, ipc.MetricsPush):
            self.collector.apply(identity.decode(), msg)
        if slot is None:
            return
        slot.last_seen = time.monotonic()
        if isinstance(msg, ipc.Ack):
            changed = (slot.acked_seq, slot.listening) != (msg.seq, msg.listening)
            slot.acked_seq = msg.seq
            slot.listening = msg.listening
            if changed:
                self.on_progress()
        elif isinstance(msg, ipc.ResyncRequest):
            self.channel.send(identity, self.snapshot())
        elif isinstance(msg, ipc.OnDemandRequest):
            if self.on_demand is not None:
                self.on_demand(identity, msg)
            else:
                reply = ipc.OnDemandReply(request_id=msg.request_id, found=False, seq=0)
                self.channel.send(identity, reply)

    def _on_hello(self, identity: bytes, msg: ipc.Hello) -> None:
        if not 0 <= msg.index < len(self.slots):
            log.warning("hello from unknown worker index %d ignored", msg.index)
            return
        slot = self.slots[msg.index]
        if slot.pid != msg.pid:
            log.warning(
                "hello from pid %d, but worker %d is pid %s; ignored", msg.pid, msg.index, slot.pid
            )
            return
        slot.identity = identity
        slot.last_seen = time.monotonic()
        self.channel.send(identity, self.snapshot())

    def _slot_by_identity(self, identity: bytes) -> WorkerSlot | None:
        for slot in self.slots:
            if slot.identity == identity:
                return slot
        return None

    # -- health -------------------------------------------------------------------------------

    async def _monitor(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            seq = self.snapshot_seq()
            for slot in self.slots:
                self._check(slot, now, seq)

    def snapshot_seq(self) -> int:
        return self.snapshot().seq

    def _check(self, slot: WorkerSlot, now: float, seq: int) -> None:
        pid = slot.pid
        if pid is None:
            return
        if now - slot.last_seen > HEARTBEAT_TIMEOUT:
            log.error(
                "worker %d (pid %d) missed heartbeats for %.0fs; killing it",
                slot.index,
                pid,
                now - slot.last_seen,
            )
            _kill(pid, signal.SIGKILL)
            slot.last_seen = now
            return
        if slot.identity is None or slot.acked_seq >= seq:
            slot.behind_since = None
            return
        if slot.behind_since is None:
            slot.behind_since = now
        elif now - slot.behind_since > SNAPSHOT_LAG:
            # A late subscriber can miss the last update with nothing after it to reveal
            # the gap; a fresh snapshot closes it.
            self.channel.send(slot.identity, self.snapshot())
            slot.behind_since = now

    def all_current(self, seq: int) -> bool:
        """Every worker is alive, listening and has applied state up to `seq`."""
        return all(s.pid is not None and s.listening and s.acked_seq >= seq for s in self.slots)

    def pids(self) -> list[int]:
        return [p for p in (s.pid for s in self.slots) if p is not None]

    # -- stopping -----------------------------------------------------------------------------

    async def stop(self, grace: float) -> None:
        """SIGTERM every worker (each drains), wait `grace` seconds, then SIGKILL the rest."""
        self.stopping = True
        procs = [s.proc for s in self.slots if s.proc is not None and s.proc.returncode is None]
        for proc in procs:
            _kill(proc.pid, signal.SIGTERM)
        if procs:
            _, pending = await asyncio.wait(
                [asyncio.ensure_future(p.wait()) for p in procs], timeout=grace
            )
            for proc in procs:
                if proc.returncode is None:
                    log.warning("worker pid %d did not exit in time; killing it", proc.pid)
                    _kill(proc.pid, signal.SIGKILL)
            if pending:
                await asyncio.wait(pending, timeout=2.0)
        await self._drain_control(0.2)
        for task in tuple(self._tasks):
            task.cancel()

    async def _drain_control(self, seconds: float) -> None:
        """Give final metric pushes already queued on the channel a moment to be read."""
        await asyncio.sleep(seconds)


def _close_channel(slot: WorkerSlot) -> None:
    """Nobody wants the fd channel: do not keep it open."""
    if slot.channel is not None:
        slot.channel.close()
        slot.channel = None


def _kill(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _status(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
