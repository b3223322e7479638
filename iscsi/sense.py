"""SCSI sense data: the table of every sense floe answers with, and the fixed-format codec.

Theory of operation. A command that fails with CHECK CONDITION carries sense data
that names what went wrong as a (SENSE KEY, ADDITIONAL SENSE CODE, ADDITIONAL SENSE
CODE QUALIFIER) triple (SPC-4 r37 §4.5, values from SPC-4 Annex D / Table D.1). The
triples floe uses are rows of one table, ``SENSE_CODES``, and each has a module-level
name so the SCSI layer never spells a number twice.

floe only produces fixed-format sense (response code 70h, SPC-4 §4.5.3): the control
mode page advertises D_SENSE=0, REQUEST SENSE with DESC=1 is refused, and libiscsi's
ModeSense6.Control-D_SENSE test holds the two together. ``parse_fixed_sense`` is the
inverse, used by the tests and the fuzzer to check every sense we emit is well formed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

# Sense keys, SPC-4 §4.5.6 Table 28.
KEY_NO_SENSE = 0x0
KEY_RECOVERED_ERROR = 0x1
KEY_NOT_READY = 0x2
KEY_MEDIUM_ERROR = 0x3
KEY_HARDWARE_ERROR = 0x4
KEY_ILLEGAL_REQUEST = 0x5
KEY_UNIT_ATTENTION = 0x6
KEY_DATA_PROTECT = 0x7
KEY_ABORTED_COMMAND = 0xB
KEY_MISCOMPARE = 0xE

# Fixed format sense data layout (SPC-4 §4.5.3 Table 27).
RESPONSE_CODE_CURRENT_FIXED = 0x70
FIXED_SENSE_LENGTH = 18  # bytes 0..17; ADDITIONAL SENSE LENGTH = 10
_ADDITIONAL_SENSE_LENGTH = FIXED_SENSE_LENGTH - 8
_INFORMATION_MAX = 0xFFFF_FFFF  # the fixed format INFORMATION field is 4 bytes


@dataclass(frozen=True, slots=True)
class SenseCode:
    """One row of the sense table: what a failure is called and how it is encoded."""

    name: str
    key: int
    asc: int
    ascq: int

    def __post_init__(self) -> None:
        if not (0 <= self.key <= 0xF and 0 <= self.asc <= 0xFF and 0 <= self.ascq <= 0xFF):
            raise ValueError(f"sense code {self.name} out of range: {self.key:x}/{self.asc:x}/{self.ascq:x}")

    def __iter__(self) -> Iterator[int]:
        """Unpacks as (key, asc, ascq), the table's row: ``fixed(*LBA_OUT_OF_RANGE)``."""
        return iter((self.key, self.asc, self.ascq))

    @property
    def asc_ascq(self) -> int:
        """ASC and ASCQ as one 16-bit number, the way libiscsi and most logs print them."""
        return (self.asc << 8) | self.ascq


def _table(*rows: tuple[str, int, int, int]) -> Mapping[str, SenseCode]:
    table = {name: SenseCode(name, key, asc, ascq) for name, key, asc, ascq in rows}
    if len(table) != len(rows):
        raise ValueError("duplicate sense code name")
    return table


# Every sense floe's SCSI layer produces: name, key, ASC, ASCQ (SPC-4 Annex D).
SENSE_CODES: Mapping[str, SenseCode] = _table(
    ("NO_SENSE", KEY_NO_SENSE, 0x00, 0x00),
    ("INTERNAL_TARGET_FAILURE", KEY_HARDWARE_ERROR, 0x44, 0x00),
    ("WRITE_ERROR", KEY_MEDIUM_ERROR, 0x0C, 0x00),
    ("PARAMETER_LIST_LENGTH_ERROR", KEY_ILLEGAL_REQUEST, 0x1A, 0x00),
    ("INVALID_COMMAND_OPERATION_CODE", KEY_ILLEGAL_REQUEST, 0x20, 0x00),
    ("LBA_OUT_OF_RANGE", KEY_ILLEGAL_REQUEST, 0x21, 0x00),
    ("INVALID_FIELD_IN_CDB", KEY_ILLEGAL_REQUEST, 0x24, 0x00),
    ("LOGICAL_UNIT_NOT_SUPPORTED", KEY_ILLEGAL_REQUEST, 0x25, 0x00),
    ("INVALID_FIELD_IN_PARAMETER_LIST", KEY_ILLEGAL_REQUEST, 0x26, 0x00),
    ("INVALID_RELEASE_OF_PERSISTENT_RESERVATION", KEY_ILLEGAL_REQUEST, 0x26, 0x04),
    ("SAVING_PARAMETERS_NOT_SUPPORTED", KEY_ILLEGAL_REQUEST, 0x39, 0x00),
    ("INSUFFICIENT_REGISTRATION_RESOURCES", KEY_ILLEGAL_REQUEST, 0x55, 0x04),
    ("SPACE_ALLOCATION_FAILED_WRITE_PROTECT", KEY_DATA_PROTECT, 0x27, 0x07),
    ("MISCOMPARE_DURING_VERIFY_OPERATION", KEY_MISCOMPARE, 0x1D, 0x00),
    ("POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED", KEY_UNIT_ATTENTION, 0x29, 0x00),
    ("BUS_DEVICE_RESET_FUNCTION_OCCURRED", KEY_UNIT_ATTENTION, 0x29, 0x03),
    ("RESERVATIONS_PREEMPTED", KEY_UNIT_ATTENTION, 0x2A, 0x03),
    ("RESERVATIONS_RELEASED", KEY_UNIT_ATTENTION, 0x2A, 0x04),
    ("REGISTRATIONS_PREEMPTED", KEY_UNIT_ATTENTION, 0x2A, 0x05),
    ("CAPACITY_DATA_HAS_CHANGED", KEY_UNIT_ATTENTION, 0x2A, 0x09),
    ("THIN_PROVISIONING_SOFT_THRESHOLD_REACHED", KEY_UNIT_ATTENTION, 0x38, 0x07),
)

NO_SENSE = SENSE_CODES["NO_SENSE"]
INTERNAL_TARGET_FAILURE = SENSE_CODES["INTERNAL_TARGET_FAILURE"]
WRITE_ERROR = SENSE_CODES["WRITE_ERROR"]
PARAMETER_LIST_LENGTH_ERROR = SENSE_CODES["PARAMETER_LIST_LENGTH_ERROR"]
INVALID_COMMAND_OPERATION_CODE = SENSE_CODES["INVALID_COMMAND_OPERATION_CODE"]
LBA_OUT_OF_RANGE = SENSE_CODES["LBA_OUT_OF_RANGE"]
INVALID_FIELD_IN_CDB = SENSE_CODES["INVALID_FIELD_IN_CDB"]
LOGICAL_UNIT_NOT_SUPPORTED = SENSE_CODES["LOGICAL_UNIT_NOT_SUPPORTED"]
INVALID_FIELD_IN_PARAMETER_LIST = SENSE_CODES["INVALID_FIELD_IN_PARAMETER_LIST"]
INVALID_RELEASE_OF_PERSISTENT_RESERVATION = SENSE_CODES["INVALID_RELEASE_OF_PERSISTENT_RESERVATION"]
SAVING_PARAMETERS_NOT_SUPPORTED = SENSE_CODES["SAVING_PARAMETERS_NOT_SUPPORTED"]
INSUFFICIENT_REGISTRATION_RESOURCES = SENSE_CODES["INSUFFICIENT_REGISTRATION_RESOURCES"]
SPACE_ALLOCATION_FAILED_WRITE_PROTECT = SENSE_CODES["SPACE_ALLOCATION_FAILED_WRITE_PROTECT"]
MISCOMPARE_DURING_VERIFY_OPERATION = SENSE_CODES["MISCOMPARE_DURING_VERIFY_OPERATION"]
POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED = SENSE_CODES["POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED"]
BUS_DEVICE_RESET_FUNCTION_OCCURRED = SENSE_CODES["BUS_DEVICE_RESET_FUNCTION_OCCURRED"]
RESERVATIONS_PREEMPTED = SENSE_CODES["RESERVATIONS_PREEMPTED"]
RESERVATIONS_RELEASED = SENSE_CODES["RESERVATIONS_RELEASED"]
REGISTRATIONS_PREEMPTED = SENSE_CODES["REGISTRATIONS_PREEMPTED"]
CAPACITY_DATA_HAS_CHANGED = SENSE_CODES["CAPACITY_DATA_HAS_CHANGED"]
THIN_PROVISIONING_SOFT_THRESHOLD_REACHED = SENSE_CODES["THIN_PROVISIONING_SOFT_THRESHOLD_REACHED"]


@dataclass(frozen=True, slots=True)
class FieldPointer:
    """Sense-key specific field pointer (SPC-4 §4.5.2.4.2): which byte (and bit) was wrong.

    ``in_cdb`` is the C/D bit: True when the byte counts from the start of the CDB,
    False when it counts from the start of the parameter list (Data-Out).
    """

    byte: int
    bit: int | None = None
    in_cdb: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.byte <= 0xFFFF:
            raise ValueError(f"field pointer byte {self.byte} does not fit 16 bits")
        if self.bit is not None and not 0 <= self.bit <= 7:
            raise ValueError(f"bit pointer {self.bit} is not 0..7")


def fixed_sense(code: SenseCode, *, information: int | None = None, field: FieldPointer | None = None) -> bytes:
    """Fixed-format current sense data (SPC-4 §4.5.3), 18 bytes.

    ``information`` sets the INFORMATION field and the VALID bit (for MISCOMPARE it is
    the offset of the first differing byte, SBC-3 §5.2 and §5.30); a value that does
    not fit the 4-byte field is left out (VALID=0) rather than truncated. ``field``
    sets SKSV and the field pointer (only meaningful for ILLEGAL REQUEST).
    """
    out = bytearray(FIXED_SENSE_LENGTH)
    out[0] = RESPONSE_CODE_CURRENT_FIXED
    out[2] = code.key
    if information is not None and 0 <= information <= _INFORMATION_MAX:
        out[0] |= 0x80
        out[3:7] = information.to_bytes(4, "big")
    out[7] = _ADDITIONAL_SENSE_LENGTH
    out[12] = code.asc
    out[13] = code.ascq
    if field is not None:
        sks = 0x80  # SKSV
        if field.in_cdb:
            sks |= 0x40  # C/D
        if field.bit is not None:
            sks |= 0x08 | field.bit  # BPV + BIT POINTER
        out[15] = sks
        out[16:18] = field.byte.to_bytes(2, "big")
    return bytes(out)


def fixed(
    key: int, asc: int, ascq: int, *, information: int | None = None, field: FieldPointer | None = None
) -> bytes:
    """``fixed_sense`` from a bare (key, asc, ascq) triple, e.g. ``fixed(*LOGICAL_UNIT_NOT_SUPPORTED)``."""
    return fixed_sense(SenseCode("", key, asc, ascq), information=information, field=field)


@dataclass(frozen=True, slots=True)
class ParsedSense:
    """What ``parse_fixed_sense`` found in a fixed-format sense buffer."""

    key: int
    asc: int
    ascq: int
    information: int | None
    field: FieldPointer | None

    def is_(self, code: SenseCode) -> bool:
        return (self.key, self.asc, self.ascq) == (code.key, code.asc, code.ascq)


def parse_fixed_sense(data: bytes) -> ParsedSense:
    """Decode fixed-format sense data; raise ValueError if it is not well formed."""
    if len(data) < 8:
        raise ValueError(f"sense data of {len(data)} bytes is shorter than the 8-byte header")
    response_code = data[0] & 0x7F
    if response_code not in (0x70, 0x71):
        raise ValueError(f"response code {response_code:#x} is not fixed format")
    additional = data[7]
    if len(data) != 8 + additional:
        raise ValueError(f"additional sense length {additional} disagrees with {len(data)} bytes")
    if additional < 6:
        raise ValueError("fixed sense too short to hold ASC/ASCQ")
    if data[2] & 0xF0:
        raise ValueError("FILEMARK/EOM/ILI or reserved bits set")
    information = int.from_bytes(data[3:7], "big") if data[0] & 0x80 else None
    field = None
    if additional >= 10 and data[15] & 0x80:
        bit = data[15] & 0x07 if data[15] & 0x08 else None
        field = FieldPointer(int.from_bytes(data[16:18], "big"), bit, bool(data[15] & 0x40))
    return ParsedSense(data[2] & 0x0F, data[12], data[13], information, field)
