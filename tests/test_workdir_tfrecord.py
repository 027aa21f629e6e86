"""training/workdir/tfrecord.py: TFRecord framing (no tensorboardX needed)."""

import struct

from pfedla_jax.training.workdir import tfrecord


def test_crc32c_check_value_and_mask():
    # the CRC-32C check value (RFC 3720 B.4 / the CRC catalogue) and its empty-input value
    assert tfrecord.crc32c(b"123456789") == 0xE3069283
    assert tfrecord.crc32c(b"") == 0
    crc = tfrecord.crc32c(b"abc")
    assert tfrecord.masked_crc32c(b"abc") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) % 2**32


def test_records_round_trip_and_a_cut_or_damaged_record_ends_them():
    payloads = [b"", b"x", bytes(range(256)) * 3]
    data = b"".join(tfrecord.encode(p) for p in payloads)
    # the framing: uint64 length, its masked CRC, the data, the data's masked CRC
    first = tfrecord.encode(b"x")
    assert first[:8] == struct.pack("<Q", 1) and first[12:13] == b"x" and len(first) == 17
    assert struct.unpack("<I", first[8:12])[0] == tfrecord.masked_crc32c(first[:8])
    assert list(tfrecord.decode(data)) == payloads
    assert list(tfrecord.decode(data[:-1])) == payloads[:2]  # the last record cut short
    damaged = bytearray(data)
    damaged[len(tfrecord.encode(b"")) + 12] ^= 1  # a bit of the second record's data flipped
    assert list(tfrecord.decode(bytes(damaged))) == payloads[:1]
    assert list(tfrecord.decode(data[:11])) == []
