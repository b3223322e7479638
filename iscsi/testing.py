"""Fakes for testing the target without a cluster (the trio `testing` idea).

StaticCatalog serves fixed logical units (over iscsi/memdev.py or any
BlockDevice) with fixed login policies (`python -m iscsi.testing` serves one
over an in-memory device). MiniInitiator is a small blocking iSCSI
initiator built on the same codec, for tests that need to send what real
initiators never would (garbage, stalls, odd sequences).
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from dataclasses import dataclass, field

from iscsi import pdu as P
from iscsi.device import BlockDevice
from iscsi.login import TargetPolicy
from iscsi.scsi import LogicalUnit, LunIdentity


@dataclass
class StaticCatalog:
    """Targets by name: a logical unit and a login policy each."""

    portal: str = "127.0.0.1:3260"
    units: dict[str, LogicalUnit] = field(default_factory=dict)
    policies: dict[str, TargetPolicy] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, name: str, device: BlockDevice, policy: TargetPolicy | None = None) -> LogicalUnit:
        serial = f"mem{len(self.units):04d}"
        naa = bytes([0x60]) + os.urandom(15)
        lu = LogicalUnit(device, LunIdentity(serial=serial, naa=naa, target_name=name))
        with self.lock:
            self.units[name] = lu
            self.policies[name] = policy or TargetPolicy(name=name)
        return lu

    def policy(self, target_name: str) -> TargetPolicy | None:
        with self.lock:
            return self.policies.get(target_name)

    def targets(self, initiator_name: str) -> list[tuple[str, list[str]]]:
        with self.lock:
            out = []
            for name, pol in sorted(self.policies.items()):
                if pol.allowed_initiators is None or initiator_name in pol.allowed_initiators:
                    out.append((name, [f"{self.portal},1"]))
            return out

    def logical_unit(self, target_name: str) -> LogicalUnit:
        with self.lock:
            return self.units[target_name]

    def fenced(self, target_name: str, lu: LogicalUnit) -> None:
        with self.lock:
            if self.units.get(target_name) is lu:
                del self.units[target_name]


def text(**keys: str | int) -> bytes:
    """Login/Text data: key=value pairs, each NUL-terminated."""
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in keys.items())


def parse_text(data: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in data.split(b"\0"):
        if item:
            k, _, v = item.decode().partition("=")
            out[k] = v
    return out


class MiniInitiator:
    """A blocking initiator: one connection, no digests, login without authentication."""

    def __init__(self, host: str, port: int, *, timeout_s: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.decoder = P.Decoder(target=False, max_data_segment=16 << 20)
        self.pending: list[P.PDU | P.Invalid] = []
        self.cmdsn = 1
        self.statsn = 0
        self.itt = 1
        self.isid = bytes([0x80, 0, 0, 0, 0x12, 0x34])

    def close(self) -> None:
        self.sock.close()

    def send(self, p: P.PDU) -> None:
        self.sock.sendall(P.encode(p))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> P.PDU | P.Invalid:
        while not self.pending:
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("target closed the connection")
            self.pending.extend(self.decoder.feed(data))
        return self.pending.pop(0)

    def login(self, target: str | None, initiator: str = "iqn.2026-11.io.floe.test:mini",
              **extra: str | int) -> P.LoginResponse:
        keys: dict[str, str | int] = {"InitiatorName": initiator}
        if target is None:
            keys["SessionType"] = "Discovery"
        else:
            keys["TargetName"] = target
        keys.update({"HeaderDigest": "None", "DataDigest": "None", "MaxRecvDataSegmentLength": 262144,
                     "InitialR2T": "No", "ImmediateData": "Yes", "MaxBurstLength": 1048576,
                     "FirstBurstLength": 262144, "ErrorRecoveryLevel": 0})
        keys.update(extra)
        self.send(P.LoginRequest(itt=self.itt, isid=self.isid, cmdsn=self.cmdsn, transit=True, csg=1, nsg=3,
                                 data=text(**keys)))
        rsp = self.recv()
        if not isinstance(rsp, P.LoginResponse):
            raise ConnectionError(f"expected a Login Response, got {rsp!r}")
        self.statsn = rsp.statsn + 1
        self.itt += 1
        return rsp

    def command(self, cdb: bytes, *, read_len: int = 0, data: bytes = b"", lun: int = 0) -> tuple[int, bytes, bytes]:
        """One SCSI command with immediate data (up to FirstBurstLength); (status, data-in, sense)."""
        itt = self.itt
        self.itt += 1
        cdb16 = cdb.ljust(16, b"\0")
        self.send(P.ScsiCommand(itt=itt, cdb=cdb16, edtl=read_len or len(data), cmdsn=self.cmdsn,
                                expstatsn=self.statsn, lun=lun, read=bool(read_len), write=bool(data), attr=1,
                                data=data))
        self.cmdsn += 1
        got = bytearray()
        while True:
            p = self.recv()
            if isinstance(p, P.DataIn) and p.itt == itt:
                got[p.buffer_offset:p.buffer_offset + len(p.data)] = p.data
                if p.status_present:
                    self.statsn = p.statsn + 1
                    return p.status, bytes(got), b""
            elif isinstance(p, P.ScsiResponse) and p.itt == itt:
                self.statsn = p.statsn + 1
                return p.status, bytes(got), p.sense
            elif isinstance(p, P.R2T) and p.itt == itt:
                chunk = data[p.buffer_offset:p.buffer_offset + p.desired_length]
                self.send(P.DataOut(itt=itt, ttt=p.ttt, expstatsn=self.statsn, buffer_offset=p.buffer_offset,
                                    final=True, data=chunk))
            elif isinstance(p, P.NopIn) and p.ttt != P.RESERVED_TAG:
                self.send(P.NopOut(itt=P.RESERVED_TAG, ttt=p.ttt, cmdsn=self.cmdsn, expstatsn=self.statsn,
                                   immediate=True))

    def read10(self, lba: int, blocks: int, block_size: int = 512) -> tuple[int, bytes, bytes]:
        return self.command(struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0), read_len=blocks * block_size)

    def write10(self, lba: int, data: bytes, block_size: int = 512) -> tuple[int, bytes, bytes]:
        return self.command(struct.pack(">BBIBHB", 0x2A, 0, lba, 0, len(data) // block_size, 0), data=data)


def main(argv: list[str] | None = None) -> int:
    """Serve an in-memory target on loopback until interrupted (for trying initiators out)."""
    import argparse
    import logging
    import signal
    import time

    from iscsi.memdev import MemDevice
    from iscsi.server import IscsiServer

    ap = argparse.ArgumentParser(prog="python -m iscsi.testing", description=main.__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=3290)
    ap.add_argument("--blocks", type=int, default=262144)
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--name", default="iqn.2026-11.io.floe:test.mem")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    catalog = StaticCatalog(portal=f"{args.host}:{args.port}")
    catalog.add(args.name, MemDevice(args.blocks, args.block_size))
    server = IscsiServer(catalog, host=args.host, port=args.port)
    server.start_in_thread()
    print(f"serving iscsi://{args.host}:{args.port}/{args.name}/0", flush=True)
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    try:
        while not stop[0]:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    server.stop_thread()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
