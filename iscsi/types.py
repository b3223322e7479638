"""Small types shared by the SCSI layer (iscsi/scsi.py) and the session layer (iscsi/session.py)."""

from __future__ import annotations

from dataclasses import dataclass

# SAM-5 status bytes.
GOOD = 0x00
CHECK_CONDITION = 0x02
CONDITION_MET = 0x04
BUSY = 0x08
RESERVATION_CONFLICT = 0x18
TASK_SET_FULL = 0x28
TASK_ABORTED = 0x40

# The largest data transfer of one command, both directions. The SCSI layer
# advertises it (Block Limits VPD, MAXIMUM TRANSFER LENGTH in blocks) and the
# session refuses commands past it before buffering any of their data.
MAX_TRANSFER_BYTES = 8 << 20


@dataclass(frozen=True, slots=True)
class Nexus:
    """An I_T nexus (SAM-5): one initiator port talking to one target port.

    initiator_port is the iSCSI initiator port name, "<InitiatorName>,i,0x<ISID in 12 hex digits>"
    (RFC 7143 §4.2.7.1 / SPC-4 TransportID); initiator_name is the InitiatorName alone;
    target_port is "<TargetName>,t,0x<TPGT in 4 hex digits>"; tpgt the portal group tag,
    which is the relative target port identifier in VPD 83h.
    """

    initiator_name: str
    isid: bytes
    target_name: str
    tpgt: int = 1

    @property
    def initiator_port(self) -> str:
        return f"{self.initiator_name},i,0x{self.isid.hex()}"

    @property
    def target_port(self) -> str:
        return f"{self.target_name},t,0x{self.tpgt:04x}"


@dataclass(frozen=True, slots=True)
class ScsiResult:
    """What one SCSI command came to: the status, Data-In bytes (already cut to the CDB's
    allocation length; the session cuts them again to the command's expected transfer
    length and reports the residual), and fixed-format sense data with CHECK CONDITION."""

    status: int = GOOD
    data: bytes = b""
    sense: bytes = b""
