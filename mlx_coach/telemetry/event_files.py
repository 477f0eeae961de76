"""TensorBoard event files whose failed writes are kept for the main thread, not raised in tensorboardX's.

tensorboardX writes events in a thread of its own. An OSError there (disk full, read-only) would end
that thread with a traceback, and the run would then block on the thread's full queue. So event files
are opened through tensorboardX's writer-factory registry (the hook of its s3:// and gs:// backends):
a SummaryWriter given `guarded_logdir(DIR)` writes into DIR through `_EventFile`, which keeps the first
OSError instead of raising it; `first_failure(DIR)` hands it to Telemetry, which raises WriteFailed.
"""

import contextlib
import os
import struct

from tensorboardX.record_writer import register_writer_factory

PREFIX = "mlx-coach-events"


class _EventFile:
    """An event file. After its first failed write, writes are dropped and the file is cut back to the
    end of its last whole record."""

    def __init__(self, path):
        self.path, self.failed, self._flushed = path, None, 0
        self._f = open(path, "wb")

    def write(self, data):
        if self.failed is None:
            try:
                self._f.write(data)
            except OSError as e:
                self._fail(e)

    def flush(self):
        if self.failed is None:
            try:
                self._f.flush()
                os.fsync(self._f.fileno())
                self._flushed = self._f.tell()
            except OSError as e:
                self._fail(e)

    def close(self):
        if self.failed is None:
            try:
                self._f.close()
            except OSError as e:
                self._fail(e)

    def _fail(self, err):
        self.failed = err
        with contextlib.suppress(OSError):
            self._f.close()  # its buffer is given up: the write it tries fails, or is cut off below
        with contextlib.suppress(OSError):
            os.truncate(self.path, _end_of_whole_records(self.path, self._flushed))


def _end_of_whole_records(path, start):
    """Where the last whole record of an event file ends, read from `start` (a record's start; tensorboardX
    flushes between records). A record: 8-byte length, 4-byte crc, the data, 4-byte crc."""
    end = start
    with open(path, "rb") as f:
        f.seek(start)
        while True:
            head = f.read(12)
            if len(head) < 12:
                return end
            (n,) = struct.unpack("Q", head[:8])  # native order, as tensorboardX packs it
            if len(f.read(n + 4)) < n + 4:
                return end
            end += 12 + n + 4


class _Factory:
    """What tensorboardX calls for a `PREFIX:DIR` logdir; keeps the files it opened by folder."""

    def __init__(self):
        self.opened = {}  # normalised folder -> [_EventFile], until forget()

    @staticmethod
    def local(path):
        return path[len(PREFIX) + 1:]

    def directory_check(self, path):
        os.makedirs(self.local(path), exist_ok=True)

    def open(self, path):
        f = _EventFile(self.local(path))
        self.opened.setdefault(os.path.normpath(os.path.dirname(f.path)), []).append(f)
        return f


_FACTORY = _Factory()
register_writer_factory(PREFIX, _FACTORY)


def guarded_logdir(folder):
    """The logdir to give SummaryWriter for event files in `folder`."""
    return f"{PREFIX}:{folder}"


def first_failure(folder):
    """(path, OSError) of the first event file in `folder` that failed a write, or None."""
    for f in _FACTORY.opened.get(os.path.normpath(str(folder)), ()):
        if f.failed is not None:
            return f.path, f.failed
    return None


def forget(folder):
    """Drop what is kept for `folder` (its writer is closed)."""
    _FACTORY.opened.pop(os.path.normpath(str(folder)), None)
