"""TFRecord framing, the container of TensorBoard event files (pure Python, no dependency).

A file is a sequence of records, each:

  uint64 length               little-endian
  uint32 masked CRC-32C       of the 8 length bytes
  byte   data[length]
  uint32 masked CRC-32C       of data

with CRC-32C the Castagnoli CRC (RFC 3720, appendix B.4) and masked_crc =
((crc >> 15) | (crc << 17)) + 0xa282ead8 (mod 2^32): TensorFlow's "TFRecords format
details" (tf.io.TFRecordWriter). tensorboardX writes the same framing, but its public
RecordWriter fsyncs on every flush and has no reader, and its CRC function is internal; the
bytes written here equal its own (tests/test_workdir_tensorboard.py compares them).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

_CASTAGNOLI = 0x82F63B78  # the CRC-32C polynomial, bit-reversed


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (_CASTAGNOLI if crc & 1 else 0)
        table.append(crc)
    return tuple(table)


_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`: crc32c(b'123456789') == 0xE3069283."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The CRC a TFRecord stores: crc32c rotated right by 15 bits plus 0xa282ead8 (mod 2^32)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def encode(data: bytes) -> bytes:
    """One record holding `data`."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


def decode(buffer: bytes) -> Iterator[bytes]:
    """The data of each record in `buffer`, in order. A record cut short or whose CRC does not
    match (an interrupted or damaged write) ends the sequence: it and what follows are not
    returned."""
    pos = 0
    while pos + 12 <= len(buffer):
        header, (header_crc,) = buffer[pos:pos + 8], struct.unpack("<I", buffer[pos + 8:pos + 12])
        end = pos + 12 + struct.unpack("<Q", header)[0]
        if header_crc != masked_crc32c(header) or end + 4 > len(buffer):
            return
        data = buffer[pos + 12:end]
        if struct.unpack("<I", buffer[end:end + 4])[0] != masked_crc32c(data):
            return
        yield data
        pos = end + 4
