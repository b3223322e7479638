"""The asyncio iSCSI server: it only moves bytes (DESIGN.md §7).

Theory of operation. One coroutine per TCP connection reads bytes, feeds the
PDU decoder (iscsi/pdu.py) and hands whole PDUs to the login machine
(iscsi/login.py) until the login completes, then to the full-feature session
machine (iscsi/session.py). Those cores do no I/O; they return actions, which
this module carries out: Send writes a PDU, Execute runs a SCSI command on the
logical unit (iscsi/scsi.py) in a worker thread (a volume's flush blocks for a
Raft commit, so device calls never run on the event loop), TaskManagement
resets the logical unit in a worker thread, Close ends the connection. Events
for one connection (PDUs read, commands completed, timer ticks) are handled
one at a time from a queue, so each core sees a single-threaded world.

What the server is told about targets comes from a Catalog (typing.Protocol):
the login policy of a target name (ACL, CHAP secrets, or a redirect to the
node that owns the volume), the targets an initiator may discover, and the
logical unit of a target (opening a volume takes its ownership, so this may
block for a lease). A logical unit whose volume was taken over raises
LunFenced: every connection to it is closed, and a new login is redirected.

Bounds (an initiator controls none of them): connections per server,
sessions per target, the login's duration, a PDU's data segment (the
decoder), commands in flight and buffered Data-Out per session (the session
machine), and the bytes queued to a connection that does not read (writes
wait for the socket to drain before the next event is taken).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from iscsi import pdu as P
from iscsi import sense as S
from iscsi.login import LoginMachine, SessionParams, TargetLimits, TargetPolicy
from iscsi.scsi import LogicalUnit, LunFenced
from iscsi.session import Close, Execute, Send, Session, SessionConfig, TaskManagement
from iscsi.types import CHECK_CONDITION, Nexus, ScsiResult

log = logging.getLogger("floe.iscsi")


class Catalog(Protocol):
    """What the server needs to know about targets. Methods may block; the server calls them
    from worker threads."""

    def policy(self, target_name: str) -> TargetPolicy | None:
        """The login policy of a target name; None if there is no such target."""
        ...

    def targets(self, initiator_name: str) -> list[tuple[str, list[str]]]:
        """SendTargets: (target name, ["host:port,tpgt", ...]) for every target the initiator may see."""
        ...

    def logical_unit(self, target_name: str) -> LogicalUnit:
        """The logical unit serving a target on this node (opened on first use)."""
        ...

    def fenced(self, target_name: str, lu: LogicalUnit) -> None:
        """`lu` raised LunFenced: this node lost the volume; forget that logical unit."""
        ...


@dataclass(frozen=True, slots=True)
class ServerLimits:
    # Connections open at once; past it a new one is closed at accept. Linux's
    # LIO defaults to no limit; 256 is far above what a node serves and keeps
    # a connect flood from exhausting file descriptors.
    connections_max: int = 256
    # Sessions of one target (volume) at once: multipath and clusters use a
    # handful; tgt's default is unlimited, LIO's per-ACL queue depth limits.
    sessions_per_target_max: int = 16
    # A login must complete within this long (open-iscsi's login timeout is 15 s).
    login_s_max: float = 20.0
    # Bytes read from the socket per call.
    read_chunk_bytes: int = 256 << 10
    # Worker threads running device calls for all sessions.
    worker_threads: int = 32
    # How often the session machines get a timer tick (NOP-In pings).
    tick_s: float = 1.0
    # Decoded PDUs waiting for their connection's coroutine. Past it the reader stops
    # reading the socket, so a peer that does not read our answers (our writes wait in
    # drain) is not read either and TCP flow control holds what it keeps sending. At the
    # 256 KiB data segment bound, 16 PDUs are at most 4 MiB per connection.
    pdus_queued_max: int = 16
    # A peer that has read none of our waiting answers for this long is dropped
    # (its connection only: the session's commands are aborted as on any loss).
    # Well past an initiator's NOP timeouts (open-iscsi: 5 s + 5 s; Windows: 15 s).
    write_stall_s_max: float = 60.0


def _lun_not_supported(cdb: bytes) -> ScsiResult:
    """A command for a LUN other than 0 (SPC-4 §4.5.? / SAM-5 §5.?): INQUIRY answers with
    peripheral qualifier 011b (not supported here), everything else with LOGICAL UNIT NOT
    SUPPORTED. REPORT LUNS is answered by LUN 0's logic before this is reached."""
    if cdb and cdb[0] == 0x12 and len(cdb) >= 6 and not cdb[1] & 1:
        alloc = int.from_bytes(cdb[3:5], "big")
        data = bytes([0x7F, 0, 0x06, 0x02, 31]) + bytes(31)
        return ScsiResult(data=data[:alloc])
    return ScsiResult(status=CHECK_CONDITION, sense=S.fixed(*S.LOGICAL_UNIT_NOT_SUPPORTED))


class _Conn:
    """One TCP connection's state, touched only by its own coroutine."""

    def __init__(self, server: IscsiServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        # Taken by the reader for each PDU it queues, given back when run() takes the PDU.
        self.pdu_slots = asyncio.Semaphore(server.limits.pdus_queued_max)
        # What SendTargets answers with, fetched from the catalog off the event loop.
        self.visible_targets: list[tuple[str, list[str]]] = []
        self.decoder = P.Decoder(target=True, max_data_segment=server.target_limits.max_recv_data_segment_length)
        self.header_digest = False
        self.data_digest = False
        self.session: Session | None = None
        self.lu: LogicalUnit | None = None
        self.nexus: Nexus | None = None
        self.key: tuple[str, bytes, str] | None = None
        self.closed = False
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"

    # ------------------------------------------------------------ output

    def send(self, p: P.PDU) -> None:
        if not self.closed:
            self.writer.write(P.encode(p, header_digest=self.header_digest, data_digest=self.data_digest))

    async def _drain(self) -> None:
        """Wait while the transport holds more than its high-water mark; a peer that
        reads nothing for write_stall_s_max loses the connection."""
        if self.closed or self.writer.transport.get_write_buffer_size() == 0:
            return  # nothing waiting: skip the coroutine machinery of drain()
        try:
            await asyncio.wait_for(self.writer.drain(), self.server.limits.write_stall_s_max)
        except TimeoutError:
            await self.close(f"peer read none of our answers for {self.server.limits.write_stall_s_max:g} s",
                             abort=True)

    async def close(self, why: str, *, abort: bool = False) -> None:
        """Close the connection; `abort` discards what the peer has not read (a plain
        close would wait for it to be read, i.e. forever for a peer that reads nothing)."""
        if self.closed:
            return
        self.closed = True
        log.info("event=iscsi_connection_closed peer=%s reason=%s", self.peer, why)
        if self.session is not None:
            self.session.close()
        self.server._forget(self)
        try:
            if abort:
                self.writer.transport.abort()
            else:
                self.writer.close()
        except (ConnectionError, OSError, RuntimeError) as e:  # the socket may be gone already
            log.debug("event=iscsi_close_error peer=%s error=%s", self.peer, e)

    # ------------------------------------------------------------ input

    async def read_loop(self) -> None:
        try:
            while not self.closed:
                data = await self.reader.read(self.server.limits.read_chunk_bytes)
                if not data:
                    await self.events.put(("eof", None))
                    return
                try:
                    pdus = self.decoder.feed(data)
                except P.ProtocolError as e:
                    await self.events.put(("protocol_error", str(e)))
                    return
                for p in pdus:
                    await self.pdu_slots.acquire()
                    await self.events.put(("pdu", p))
        except (ConnectionError, OSError) as e:
            await self.events.put(("eof", str(e)))

    async def run(self) -> None:
        reader_task = asyncio.create_task(self.read_loop())
        login = LoginMachine(self.server.catalog.policy, limits=self.server.target_limits,
                             tsih_alloc=self.server._tsih)
        deadline = time.monotonic() + self.server.limits.login_s_max
        try:
            while not self.closed:
                timeout = None if self.session is not None else max(0.0, deadline - time.monotonic())
                try:
                    kind, value = await asyncio.wait_for(self.events.get(), timeout)
                except TimeoutError:
                    await self.close("login did not complete in time")
                    break
                if kind == "pdu":
                    self.pdu_slots.release()
                if kind in ("eof", "protocol_error"):
                    await self.close(value or "peer closed")
                    break
                if self.session is None:
                    await self._login_event(login, kind, value)
                else:
                    await self._session_event(kind, value)
                if not self.closed:
                    await self._drain()
        except (ConnectionError, OSError) as e:
            await self.close(f"socket error: {e}")
        except Exception:
            log.exception("event=iscsi_connection_failed peer=%s", self.peer)
            await self.close("internal error")
        finally:
            reader_task.cancel()

    async def _login_event(self, login: LoginMachine, kind: str, value: Any) -> None:
        if kind != "pdu":
            return
        if not isinstance(value, P.LoginRequest):
            # RFC 7143 §6.3: only Login Requests in the login phase; anything else ends it.
            await self.close(f"{type(value).__name__} during login")
            return
        step = await asyncio.get_running_loop().run_in_executor(self.server.pool, login.receive, value)
        if step.done and step.params is not None:
            refused = await self._start_session(step.params)
            if refused is not None:
                # RFC 7143 §11.13.5: a status the initiator can act on (0301h: retry later;
                # 0302h: out of resources) rather than a bare close after a good negotiation.
                status, why = refused
                self.send(dataclasses.replace(step.response, status_class=status >> 8, status_detail=status & 0xFF,
                                              transit=False, nsg=0, tsih=0, data=b""))
                await self._drain()
                await self.close(why)
                return
        self.send(step.response)
        if step.close:
            await self._drain()
            await self.close("login refused or redirected")
            return
        if step.done and step.params is not None:
            prm = step.params
            self.header_digest, self.data_digest = prm.header_digest, prm.data_digest
            self.decoder.header_digest, self.decoder.data_digest = prm.header_digest, prm.data_digest

    async def _start_session(self, prm: SessionParams) -> tuple[int, str] | None:
        """Build the session machine before the final login response goes out; or say why
        not: (login status, reason)."""
        loop = asyncio.get_running_loop()
        discovery = prm.session_type == "Discovery"
        target = prm.target_name or ""
        nexus = Nexus(prm.initiator_name, bytes(prm.isid), target, prm.tpgt)
        expected: Callable[[bytes], int | None] = lambda _cdb: 0  # noqa: E731
        if not discovery:
            try:
                self.lu = await loop.run_in_executor(self.server.pool, self.server.catalog.logical_unit, target)
            except Exception as e:  # noqa: BLE001 - the volume could not be opened here
                log.warning("event=iscsi_lu_unavailable target=%s error=%s", target, e)
                return 0x0301, f"logical unit unavailable: {e}"  # SERVICE UNAVAILABLE
            expected = self.lu.expected_data_out
            self.key = (prm.initiator_name, bytes(prm.isid), target)
            if not self.server._admit(self):
                self.key = None
                return 0x0302, "too many sessions to this target"  # OUT OF RESOURCES
        cfg = SessionConfig(
            nexus=nexus, discovery=discovery, exp_cmdsn=prm.exp_cmdsn, statsn=prm.statsn,
            max_send_data_segment=prm.max_recv_data_segment_length_initiator,
            max_recv_data_segment=prm.max_recv_data_segment_length_target,
            max_burst_length=prm.max_burst_length, first_burst_length=prm.first_burst_length,
            initial_r2t=prm.initial_r2t, immediate_data=prm.immediate_data,
            max_outstanding_r2t=prm.max_outstanding_r2t,
            cmd_window=self.server.target_limits.cmd_window,
            targets=lambda: self.visible_targets,
        )
        self.nexus = nexus
        self.session = Session(cfg, expected_data_out=expected, now=time.monotonic())
        log.info("event=iscsi_session_started peer=%s initiator=%s target=%s isid=%s", self.peer,
                 prm.initiator_name, target or "(discovery)", bytes(prm.isid).hex())
        return None

    async def _session_event(self, kind: str, value: Any) -> None:
        session = self.session
        if session is None:
            return
        if kind == "pdu" and isinstance(value, P.TextRequest) and self.nexus is not None:
            # Catalog.targets may block (the cluster's reads every volume's ACL from the KV):
            # ask it in a worker thread, before the session machine, which does no I/O, answers.
            self.visible_targets = await asyncio.get_running_loop().run_in_executor(
                self.server.pool, self.server.catalog.targets, self.nexus.initiator_name)
        now = time.monotonic()
        if kind == "pdu":
            actions = session.receive(value, now, bhs=value.bhs if isinstance(value, P.Invalid) else b"")
        elif kind == "done":
            task, result = value
            actions = session.completed(task, result, now)
        elif kind == "tmf_done":
            actions = session.tmf_done(value, now)
        elif kind == "tick":
            actions = session.tick(now)
        elif kind == "fenced":
            await self.close("this node no longer owns the volume")
            return
        else:
            return
        await self._perform(actions)

    async def _perform(self, actions: list[Any]) -> None:
        for a in actions:
            if isinstance(a, Send):
                if isinstance(a.pdu, P.Reject):
                    log.info("event=iscsi_reject peer=%s reason=%#x opcode=%#x", self.peer, a.pdu.reason,
                             a.pdu.bhs[0] & 0x3F if a.pdu.bhs else -1)
                self.send(a.pdu)
            elif isinstance(a, Execute):
                self._execute(a)
            elif isinstance(a, TaskManagement):
                self._task_management(a)
            elif isinstance(a, Close):
                await self._drain()
                await self.close(a.reason)
                return

    def _execute(self, a: Execute) -> None:
        loop = asyncio.get_running_loop()
        lu, nexus = self.lu, self.nexus

        def run() -> ScsiResult:
            if lu is None or nexus is None:
                return ScsiResult(status=CHECK_CONDITION, sense=S.fixed(*S.LOGICAL_UNIT_NOT_SUPPORTED))
            if a.lun != 0 and not (a.cdb and a.cdb[0] == 0xA0):
                return _lun_not_supported(a.cdb)
            return lu.execute(nexus, a.cdb, a.data_out)

        def fenced() -> None:
            if lu is not None and self.key is not None:
                self.server.catalog_fenced(self.key[2], lu)
            self.events.put_nowait(("fenced", None))

        def job() -> None:
            # In a worker thread; what it found is handed to the loop through the server's
            # completion queue (one wake-up for every completion that piles up meanwhile),
            # not through an asyncio future per command.
            done: Callable[[], None]
            try:
                result = run()
            except LunFenced:
                done = fenced
            except Exception as exc:  # noqa: BLE001 - any device failure is the command's, not the server's
                log.error("event=iscsi_execute_failed error=%r", exc)
                failure = ScsiResult(status=CHECK_CONDITION, sense=S.fixed(*S.INTERNAL_TARGET_FAILURE))
                done = functools.partial(self.events.put_nowait, ("done", (a.task, failure)))
            else:
                done = functools.partial(self.events.put_nowait, ("done", (a.task, result)))
            self.server._complete(loop, done)

        self.server.pool.submit(job)

    def _task_management(self, a: TaskManagement) -> None:
        loop = asyncio.get_running_loop()
        lu, nexus = self.lu, self.nexus

        def run() -> None:
            if lu is None or nexus is None:
                return
            if a.function == 5:  # LUN RESET
                lu.lun_reset(nexus)
            elif a.function in (6, 7):  # TARGET WARM / COLD RESET
                lu.target_reset(nexus)

        fut = loop.run_in_executor(self.server.pool, run)
        fut.add_done_callback(lambda _f: self.events.put_nowait(("tmf_done", a.task)))


class IscsiServer:
    """Serves the targets of a Catalog on one TCP portal."""

    def __init__(self, catalog: Catalog, *, host: str, port: int, limits: ServerLimits | None = None,
                 target_limits: TargetLimits | None = None) -> None:
        self.catalog = catalog
        self.host = host
        self.port = port
        self.limits = limits or ServerLimits()
        self.target_limits = target_limits or TargetLimits()
        self.pool = ThreadPoolExecutor(max_workers=self.limits.worker_threads, thread_name_prefix="iscsi")
        self._conns: set[_Conn] = set()
        self._sessions: dict[tuple[str, bytes, str], _Conn] = {}
        self._tsih = _counter()
        self._server: asyncio.AbstractServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Worker threads' completions waiting for the loop, and whether a wake-up is on its way.
        self._completions: collections.deque[Callable[[], None]] = collections.deque()
        self._completions_lock = threading.Lock()
        self._wake_pending = False
        self._thread: threading.Thread | None = None
        self._ticker: asyncio.Task[None] | None = None
        self.stats: dict[str, int] = {"connections": 0, "sessions": 0, "refused": 0}

    # ------------------------------------------------------------ sessions

    def _complete(self, loop: asyncio.AbstractEventLoop, done: Callable[[], None]) -> None:
        """From a worker thread: run `done` on the loop. Under load many completions
        share one call_soon_threadsafe (and one self-pipe write and loop wake-up)."""
        with self._completions_lock:
            self._completions.append(done)
            if self._wake_pending:
                return
            self._wake_pending = True
        try:
            loop.call_soon_threadsafe(self._run_completions)
        except RuntimeError:  # the loop is closed: the server is stopping, nobody waits
            with self._completions_lock:
                self._completions.clear()
                self._wake_pending = False

    def _run_completions(self) -> None:
        with self._completions_lock:
            batch = list(self._completions)
            self._completions.clear()
            self._wake_pending = False
        for done in batch:
            try:
                done()
            except Exception:  # one connection's trouble must not lose the others' completions
                log.exception("event=iscsi_completion_failed")

    def _admit(self, conn: _Conn) -> bool:
        """Register a new normal session; reinstate (close) an older one with the same
        initiator, ISID and target (RFC 7143 §6.3.5 session reinstatement)."""
        if conn.key is None:
            return True
        old = self._sessions.get(conn.key)
        # Count the others first: a refused login must not end the session it would reinstate.
        count = sum(1 for k in self._sessions if k[2] == conn.key[2] and k != conn.key)
        if count >= self.limits.sessions_per_target_max:
            self.stats["refused"] += 1
            return False
        if old is not None and old is not conn:
            log.info("event=iscsi_session_reinstated initiator=%s target=%s", conn.key[0], conn.key[2])
            asyncio.get_running_loop().create_task(old.close("session reinstated"))
            self._sessions.pop(conn.key, None)
        self._sessions[conn.key] = conn
        self.stats["sessions"] += 1
        return True

    def _forget(self, conn: _Conn) -> None:
        self._conns.discard(conn)
        if conn.key is not None and self._sessions.get(conn.key) is conn:
            del self._sessions[conn.key]
            if conn.lu is not None and conn.nexus is not None:
                lu, nexus = conn.lu, conn.nexus
                self.pool.submit(lu.nexus_lost, nexus)

    def catalog_fenced(self, target: str, lu: LogicalUnit) -> None:
        self.pool.submit(self.catalog.fenced, target, lu)
        for conn in list(self._conns):
            if conn.lu is lu:
                conn.events.put_nowait(("fenced", None))

    # ------------------------------------------------------------ running

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._conns) >= self.limits.connections_max:
            self.stats["refused"] += 1
            writer.close()
            return
        conn = _Conn(self, reader, writer)
        self._conns.add(conn)
        self.stats["connections"] += 1
        await conn.run()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.limits.tick_s)
            for conn in list(self._conns):
                if conn.session is not None:
                    conn.events.put_nowait(("tick", None))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port, reuse_address=True)
        if self.port == 0:
            self.port = self._server.sockets[0].getsockname()[1]
        self._ticker = asyncio.create_task(self._tick())
        log.info("event=iscsi_listening address=%s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            await conn.close("server stopping")
        self.pool.shutdown(wait=False, cancel_futures=True)

    def start_in_thread(self) -> None:
        """Run the server on its own event loop thread (for the synchronous node process)."""
        ready = threading.Event()
        errors: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self.start())
            except BaseException as e:  # noqa: BLE001 - reported to the caller
                errors.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()

        self._thread = threading.Thread(target=main, name="iscsi-server", daemon=True)
        self._thread.start()
        ready.wait()
        if errors:
            raise errors[0]

    def stop_thread(self) -> None:
        loop = self._loop
        if loop is None:
            return
        asyncio.run_coroutine_threadsafe(self.stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)


def _counter() -> Callable[[], int]:
    """TSIHs: 16-bit, never 0 (RFC 7143 §11.12.6: 0 means 'new session')."""
    it = itertools.count(1)
    lock = threading.Lock()

    def nxt() -> int:
        with lock:
            return (next(it) - 1) % 0xFFFF + 1

    return nxt


__all__ = ["Catalog", "IscsiServer", "ServerLimits"]
