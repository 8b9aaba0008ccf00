"""TensorBoard event files of scalars, written here: all that the metrics log needs of a TensorBoard writer.

tensorboardX, the writer used before, imports torch whenever torch is installed (only to accept torch
tensors; the metrics are floats): 2-3 s at every training start. Keeping torch out of that import took a
`None` entry in `sys.modules`, which changes the whole process: another thread's `import torch` fails
meanwhile, and tensorboardX stays convinced that torch is absent. Writing the events directly needs
neither, and the format is small and stable:

- a file `events.out.tfevents.<time>.<host>` of TFRecords: each record is its length (uint64 LE), the
  masked CRC-32C of those 8 bytes, the bytes, and their masked CRC-32C;
- each record one `Event` protocol buffer (TensorFlow's event.proto: wall_time = 1, step = 2,
  file_version = 3, summary = 5, session_log = 7; a Summary's `value` = 1 holds tag = 1 and
  simple_value = 2);
- first the file version, then a `SessionLog` START at the step the run goes on from (TensorBoard then
  drops the steps at and after it read from earlier files: a resumed or rolled-back run reads as one,
  tensorboardX's `purge_step`), then one event per scalar.
"""
from __future__ import annotations

import itertools
import os
import socket
import struct
import time
from pathlib import Path


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # CRC-32C (Castagnoli), reflected
        table.append(crc)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum: the CRC-32C rotated right by 15 bits plus a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (string, bytes or message)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(step: int, what: bytes) -> bytes:
    """An Event at `step` (>= 0), stamped now, holding `what` (one of its encoded fields)."""
    return b"\x09" + struct.pack("<d", time.time()) + b"\x10" + _varint(step) + what


class ScalarEventWriter:
    """Scalars into a new event file in `logdir`, which TensorBoard reads as going on from `purge_step`."""

    def __init__(self, logdir: str | Path, *, purge_step: int):
        logdir = Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}"
        for n in itertools.count():  # a rollback reopens within the same second: a new file, never overwritten
            try:
                self._file = open(logdir / (name if n == 0 else f"{name}.{n}"), "xb")
                break
            except FileExistsError:
                continue
        self._write(_event(purge_step, _field(3, b"brain.Event:2")))
        self._write(_event(purge_step, _field(7, b"\x08\x01")))  # SessionLog{status: START}

    def _write(self, record: bytes) -> None:
        length = struct.pack("<Q", len(record))
        self._file.write(length + struct.pack("<I", masked_crc32c(length)) + record
                         + struct.pack("<I", masked_crc32c(record)))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        value_proto = _field(1, tag.encode()) + b"\x15" + struct.pack("<f", value)  # tag, simple_value
        self._write(_event(step, _field(5, _field(1, value_proto))))  # Event.summary.value

    def flush(self) -> None:
        """Onto the disk (a preempted job keeps what it logged); an OSError names the file."""
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as e:
            raise OSError(e.errno, e.strerror, self._file.name) from None

    def close(self) -> None:
        self._file.close()
