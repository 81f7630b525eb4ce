"""The supervisor's per-pod proxy bookkeeping in shared (in-pod) mode: the ZDS `PodHandler`.

The ZDS client (`ztunnel.supervisor.zds`) hands every pod's network-namespace fd here; the
proxies themselves run in the workers, one per pod in every worker (DESIGN §1), so a pod
is "started" once every live worker has bound that pod's listeners inside its netns and
said so. Per worker there is one fd channel (`ztunnel.fdchannel`):

    supervisor -> worker   PodAdded + the netns fd, PodRemoved
    worker -> supervisor   PodAcked(uid, error)

`add` sends PodAdded to every live worker and waits (ACK_TIMEOUT) for all their acks; any
error (or silence) undoes it on every worker and raises, which the ZDS client turns into
the NACK `failure to start proxy : …` and a retry. `delete` sends PodRemoved to every
worker and waits for the acks, so the pod's connections are cut before the node agent
tears the netns down. A worker that exits while an answer is awaited is not an error: its
replacement gets every pod again (`worker_started` replays them).

Metrics (upstream src/inpod/metrics.rs, on the root registry with the `workload_manager_`
prefix): active and pending proxy counts, proxies started and stopped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge

from ztunnel import fdchannel
from ztunnel.core.config import WorkloadInfo
from ztunnel.netns import NetnsID, netns_id
from ztunnel.supervisor.arbiter import WorkerSlot
from ztunnel.supervisor.metrics import help_text

log = logging.getLogger(__name__)

ACK_TIMEOUT = 10.0  # seconds for every worker to answer one PodAdded / PodRemoved


class PodStartError(Exception):
    """At least one worker could not start the pod's proxy; the message says which and why."""


@dataclass(slots=True, eq=False)
class _Pod:
    uid: str
    info: WorkloadInfo
    fd: int  # our own dup of the pod's netns fd, sent to every (re)started worker
    id: NetnsID
    up: bool = False  # every worker acked; until then an add is in flight


@dataclass(slots=True, eq=False)
class _Answer:
    """One worker's answer: "" (ok), an error, or None (the worker went away)."""

    error: str | None


@dataclass(slots=True, eq=False)
class _Worker:
    """One worker's fd channel and the acks awaited on it."""

    index: int
    sock: socket.socket
    waiters: dict[str, collections.deque[asyncio.Future[_Answer]]] = field(default_factory=dict)
    reader: asyncio.Task[None] | None = None
    closed: bool = False

    def expect(self, uid: str) -> asyncio.Future[_Answer]:
        fut: asyncio.Future[_Answer] = asyncio.get_running_loop().create_future()
        self.waiters.setdefault(uid, collections.deque()).append(fut)
        return fut

    def resolve(self, uid: str, answer: _Answer) -> bool:
        queue = self.waiters.get(uid)
        while queue:
            fut = queue.popleft()
            if not queue:
                del self.waiters[uid]
            if not fut.done():
                fut.set_result(answer)
                return True
        return False

    def forget(self, uid: str, fut: asyncio.Future[_Answer]) -> None:
        queue = self.waiters.get(uid)
        if queue is not None and fut in queue:
            queue.remove(fut)
            if not queue:
                del self.waiters[uid]

    def fail_all(self) -> None:
        waiters, self.waiters = self.waiters, {}
        for queue in waiters.values():
            for fut in queue:
                if not fut.done():
                    fut.set_result(_Answer(None))


class _Metrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        def name(n: str) -> str:
            return f"workload_manager_{n}"

        self.active = Gauge(
            name("active_proxy_count"),
            help_text(
                name("active_proxy_count"),
                "The total number current workloads with active proxies (unstable)",
            ),
            registry=registry,
        )
        self.pending = Gauge(
            name("pending_proxy_count"),
            help_text(
                name("pending_proxy_count"),
                "The total number current workloads with pending proxies (unstable)",
            ),
            registry=registry,
        )
        self.started = Counter(
            name("proxies_started"),
            help_text(
                name("proxies_started"), "The total number of proxies that were started (unstable)"
            ),
            registry=registry,
        )
        self.stopped = Counter(
            name("proxies_stopped"),
            help_text(
                name("proxies_stopped"), "The total number of proxies that were stopped (unstable)"
            ),
            registry=registry,
        )


class PodManager:
    """Implements `ztunnel.supervisor.zds.PodHandler` over the workers' fd channels."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, ack_timeout: float = ACK_TIMEOUT
    ) -> None:
        self.ack_timeout = ack_timeout
        self._pods: dict[str, _Pod] = {}
        self._workers: dict[int, _Worker] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._failed: dict[str, WorkloadInfo] = {}  # last info of pods that failed to start
        # The uids the ZDS client retries (its pending set), for the gauge and the dump.
        self.pending_source: Callable[[], Collection[str]] = frozenset
        self._metrics = _Metrics(registry)
        self._metrics.pending.set_function(lambda: len(self.pending_source()))

    # -- PodHandler -------------------------------------------------------------------------------

    async def add(self, uid: str, info: WorkloadInfo, netns_fd: int) -> None:
        fd = os.dup(netns_fd)
        try:
            nid = netns_id(fd)
        except OSError:
            os.close(fd)
            raise
        old = self._pods.pop(uid, None)
        if old is not None:  # the ZDS client removes first; never leave two for one uid
            await self._stop(old)
        pod = _Pod(uid, info, fd, nid)
        self._pods[uid] = pod  # visible to workers that start meanwhile (replay)
        errors = await self._broadcast(pod, self._added(pod), with_fd=True)
        if errors:
            if self._pods.get(uid) is pod:
                del self._pods[uid]
            await self._broadcast(pod, fdchannel.PodRemoved(uid=uid), with_fd=False)
            os.close(fd)
            self._failed[uid] = info
            raise PodStartError("; ".join(errors))
        pod.up = True
        self._failed.pop(uid, None)
        self._metrics.started.inc()
        self._update_active()
        log.info(
            "proxy for pod %s (%s/%s) is up in %d workers",
            uid,
            info.namespace,
            info.name,
            len(self._workers),
        )

    async def delete(self, uid: str) -> None:
        self._failed.pop(uid, None)
        pod = self._pods.pop(uid, None)
        if pod is None:
            return
        await self._stop(pod)
        log.info("proxy for pod %s (%s/%s) stopped", uid, pod.info.namespace, pod.info.name)

    def known(self) -> set[str]:
        return {uid for uid, pod in self._pods.items() if pod.up}

    # -- workers ----------------------------------------------------------------------------------

    def worker_started(self, slot: WorkerSlot) -> None:
        """Arbiter hook: take the new worker's fd channel and give it every pod."""
        sock, slot.channel = slot.channel, None
        if sock is None:
            return
        old = self._workers.pop(slot.index, None)
        if old is not None and old.reader is not None:
            old.reader.cancel()  # normally over already: the old worker's exit ended it
        worker = _Worker(slot.index, sock)
        self._workers[slot.index] = worker
        worker.reader = self._spawn(self._read(worker), f"fd-channel-{slot.index}")
        if self._pods:
            self._spawn(self._replay(worker, list(self._pods.values())), f"replay-{slot.index}")

    async def _replay(self, worker: _Worker, pods: list[_Pod]) -> None:
        for pod in pods:
            if self._pods.get(pod.uid) is not pod:
                continue  # removed meanwhile
            error = await self._ask(worker, pod, self._added(pod), with_fd=True)
            if error:
                log.error("worker %d could not start pod %s: %s", worker.index, pod.uid, error)

    async def _read(self, worker: _Worker) -> None:
        try:
            while True:
                header, fds = await fdchannel.recv(worker.sock)
                fdchannel.close_fds(fds)  # workers send none
                try:
                    msg = fdchannel.decode(header)
                except fdchannel.FdChannelError as e:
                    log.warning("worker %d: %s", worker.index, e)
                    continue
                if not isinstance(msg, fdchannel.PodAcked):
                    log.warning("worker %d sent an unexpected %s", worker.index, type(msg).__name__)
                elif not worker.resolve(msg.uid, _Answer(msg.error)):
                    log.debug("worker %d: unexpected ack for pod %s", worker.index, msg.uid)
        except fdchannel.ChannelClosed:
            log.debug("worker %d closed its fd channel", worker.index)
        except (OSError, fdchannel.FdChannelError) as e:
            log.warning("worker %d fd channel failed: %s", worker.index, e)
        finally:
            worker.closed = True
            worker.fail_all()
            worker.sock.close()
            if self._workers.get(worker.index) is worker:
                del self._workers[worker.index]

    # -- messaging --------------------------------------------------------------------------------

    @staticmethod
    def _added(pod: _Pod) -> fdchannel.PodAdded:
        return fdchannel.PodAdded(
            uid=pod.uid,
            name=pod.info.name,
            namespace=pod.info.namespace,
            service_account=pod.info.service_account,
            netns_id=(pod.id.dev, pod.id.ino),
        )

    async def _broadcast(
        self, pod: _Pod, msg: fdchannel.PodAdded | fdchannel.PodRemoved, *, with_fd: bool
    ) -> list[str]:
        """Send `msg` to every live worker; the errors of those that refused or stayed silent."""
        workers = [w for w in self._workers.values() if not w.closed]
        answers = await asyncio.gather(*(self._ask(w, pod, msg, with_fd=with_fd) for w in workers))
        return [f"worker {w.index}: {a}" for w, a in zip(workers, answers, strict=True) if a]

    async def _ask(
        self,
        worker: _Worker,
        pod: _Pod,
        msg: fdchannel.PodAdded | fdchannel.PodRemoved,
        *,
        with_fd: bool,
    ) -> str:
        """One worker's answer to `msg`: "" when it is done (or went away), else the error."""
        if worker.closed:
            return ""  # gone since the broadcast began; its replacement gets a replay
        fut = worker.expect(pod.uid)
        try:
            await fdchannel.asend(worker.sock, fdchannel.encode(msg), [pod.fd] if with_fd else [])
            async with asyncio.timeout(self.ack_timeout):
                answer = await fut
        except OSError as e:  # the worker is gone; its replacement gets a replay
            log.debug("worker %d: fd channel send failed: %s", worker.index, e)
            return ""
        except TimeoutError:
            return f"no answer within {self.ack_timeout:.0f}s"
        finally:
            worker.forget(pod.uid, fut)
        return answer.error or ""

    async def _stop(self, pod: _Pod) -> None:
        try:
            errors = await self._broadcast(pod, fdchannel.PodRemoved(uid=pod.uid), with_fd=False)
            for error in errors:
                log.error("stopping the proxy of pod %s: %s", pod.uid, error)
        finally:
            os.close(pod.fd)
            if pod.up:
                self._metrics.stopped.inc()
            self._update_active()

    def _update_active(self) -> None:
        self._metrics.active.set(sum(1 for p in self._pods.values() if p.up))

    def _spawn(self, coro: object, name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("pod manager task %s failed", task.get_name(), exc_info=task.exception())

    # -- admin and shutdown -----------------------------------------------------------------------

    def dump(self) -> dict[str, object]:
        """`config_dump.workloadState` (upstream src/inpod/admin.rs), without connections."""
        out: dict[str, object] = {}
        for uid in sorted(self.pending_source()):
            info = self._failed.get(uid)
            if info is not None:
                out[uid] = {"state": "Pending", "info": _info_json(info)}
        for uid, pod in sorted(self._pods.items()):
            if pod.up:
                out[uid] = {"state": "Up", "info": _info_json(pod.info)}
        return out

    async def close(self) -> None:
        """Stop reading the workers' channels and release every netns fd."""
        tasks = tuple(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for pod in self._pods.values():
            with contextlib.suppress(OSError):
                os.close(pod.fd)
        self._pods.clear()
        self._update_active()


def _info_json(info: WorkloadInfo) -> dict[str, str]:
    return {
        "name": info.name,
        "namespace": info.namespace,
        "serviceAccount": info.service_account,
    }
