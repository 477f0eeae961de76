"""Plain data over a socket between the judge and the worker: a codec that executes nothing.

Only None, bool, int, float, str, bytes, list, tuple, dict, set and frozenset (nested) are
encoded, by exact type: a subclass (an int with its own __eq__) is refused by `encode`, and
`decode` only ever builds these built-in types from tags and lengths, so decoding bytes from an
untrusted worker runs none of the worker's code (no pickle, no eval, no constructor by name).

Format: one tag byte, then
    N T F                  None, True, False
    i <8-byte signed>      an int that fits in 64 bits; I <u32 n> <n bytes, signed big-endian> otherwise
    f <8-byte IEEE double> exact: nan, inf and -0.0 included
    s <u32 n> <utf-8>      (surrogatepass, so every str round-trips); b <u32 n> <bytes>
    l t S z <u32 n> items  list, tuple, set, frozenset
    d <u32 n> key value... dict
A frame on the socket is <u32 length> <encoded value>. `decode` bounds the frame size, the nesting
depth and every count by the bytes left, and raises WireError on anything malformed.
"""

import os
import select
import struct
import time

MAX_FRAME = 32 << 20  # bytes of one message; more is a malformed message, not an allocation
MAX_DEPTH = 64

# Bound at import: the worker's sample may replace builtins or os functions before a reply is sent.
_type, _len, _bytes_join, _write, _read_fd = type, len, b"".join, os.write, os.read
_None_t, _bool, _int, _float, _str, _bytes, _dict = type(None), bool, int, float, str, bytes, dict
_list, _tuple, _set, _frozenset = list, tuple, set, frozenset
_Q = struct.Struct(">q")
_D = struct.Struct(">d")
_U = struct.Struct(">I")


class WireError(ValueError):
    """Malformed bytes, a value that is not plain data, a closed peer, or a missed deadline."""


class PeerClosed(WireError):
    pass


class Deadline(WireError):
    pass


def encode(value) -> bytes:
    out = []
    _enc(value, out, 0)
    return _bytes_join(out)


def _enc(x, out, depth):
    if depth > MAX_DEPTH:
        raise WireError(f"nested deeper than {MAX_DEPTH}")
    t = _type(x)
    if t is _None_t:
        out.append(b"N")
    elif t is _bool:
        out.append(b"T" if x else b"F")
    elif t is _int:
        if -(1 << 63) <= x < (1 << 63):
            out.append(b"i" + _Q.pack(x))
        else:
            raw = x.to_bytes((x.bit_length() + 8) // 8, "big", signed=True)
            out.append(b"I" + _U.pack(_len(raw)) + raw)
    elif t is _float:
        out.append(b"f" + _D.pack(x))
    elif t is _str:
        raw = x.encode("utf-8", "surrogatepass")
        out.append(b"s" + _U.pack(_len(raw)) + raw)
    elif t is _bytes:
        out.append(b"b" + _U.pack(_len(x)) + x)
    elif t in _SEQ_TAGS:
        out.append(_SEQ_TAGS[t] + _U.pack(_len(x)))
        for item in x:
            _enc(item, out, depth + 1)
    elif t is _dict:
        out.append(b"d" + _U.pack(_len(x)))
        for k, v in x.items():
            _enc(k, out, depth + 1)
            _enc(v, out, depth + 1)
    else:
        raise WireError(f"an object of type {t.__name__} is not plain data")


_SEQ_TAGS = {_list: b"l", _tuple: b"t", _set: b"S", _frozenset: b"z"}


def decode(data: bytes):
    if len(data) > MAX_FRAME:
        raise WireError(f"message of {len(data)} bytes is over the {MAX_FRAME}-byte limit")
    view = memoryview(data)
    try:
        value, end = _dec(view, 0, 0)
    except (IndexError, struct.error, UnicodeDecodeError, TypeError, RecursionError) as e:
        # TypeError: an unhashable key or set item; RecursionError cannot happen under MAX_DEPTH
        raise WireError(f"malformed message: {type(e).__name__}: {e}") from None
    if end != len(data):
        raise WireError(f"malformed message: {len(data) - end} trailing bytes")
    return value


def _count(view, pos):
    (n,) = _U.unpack_from(view, pos)
    if n > len(view) - pos - 4:  # every item takes at least one byte
        raise WireError("malformed message: a length runs past the end")
    return n, pos + 4


def _dec(view, pos, depth):
    if depth > MAX_DEPTH:
        raise WireError(f"malformed message: nested deeper than {MAX_DEPTH}")
    tag = view[pos]
    pos += 1
    if tag == 0x4E:  # N
        return None, pos
    if tag == 0x54:  # T
        return True, pos
    if tag == 0x46:  # F
        return False, pos
    if tag == 0x69:  # i
        return _Q.unpack_from(view, pos)[0], pos + 8
    if tag == 0x66:  # f
        return _D.unpack_from(view, pos)[0], pos + 8
    if tag in (0x49, 0x73, 0x62):  # I s b
        n, pos = _count(view, pos)
        raw = bytes(view[pos:pos + n])
        if tag == 0x49:
            return int.from_bytes(raw, "big", signed=True), pos + n
        return (raw.decode("utf-8", "surrogatepass") if tag == 0x73 else raw), pos + n
    if tag in (0x6C, 0x74, 0x53, 0x7A):  # l t S z
        n, pos = _count(view, pos)
        items = []
        for _ in range(n):
            item, pos = _dec(view, pos, depth + 1)
            items.append(item)
        if tag == 0x6C:
            return items, pos
        return (tuple if tag == 0x74 else set if tag == 0x53 else frozenset)(items), pos
    if tag == 0x64:  # d
        n, pos = _count(view, pos)
        out = {}
        for _ in range(n):
            k, pos = _dec(view, pos, depth + 1)
            v, pos = _dec(view, pos, depth + 1)
            out[k] = v
        return out, pos
    raise WireError(f"malformed message: unknown tag {tag:#x}")


# ---------------------------------------------------------------------------------------------
# Frames on a socket descriptor (raw descriptors: the socket module's imports would lengthen every start)


def frame(data: bytes) -> bytes:
    return _U.pack(len(data)) + data


def send(fd: int, value, deadline=None) -> None:
    write_all(fd, frame(encode(value)), deadline)


def write_all(fd: int, data: bytes, deadline=None) -> None:
    view = memoryview(data)
    while view:
        _wait(fd, deadline, write=True)
        try:
            view = view[_write(fd, view[:1 << 20]):]
        except (BrokenPipeError, ConnectionResetError):
            raise PeerClosed("the other process closed the connection") from None


def recv(fd: int, deadline=None):
    """The next value, decoded; Deadline if it has not fully arrived by `deadline` (monotonic)."""
    (n,) = _U.unpack(_read(fd, 4, deadline))
    if n > MAX_FRAME:
        raise WireError(f"message of {n} bytes announced, over the {MAX_FRAME}-byte limit")
    return decode(_read(fd, n, deadline))


def _wait(fd, deadline, write=False):
    if deadline is None:
        return
    left = deadline - time.monotonic()
    if left <= 0 or not select.select([] if write else [fd], [fd] if write else [], [], left)[0 + write]:
        raise Deadline("no answer before the deadline")


def _read(fd, n, deadline):
    buf = bytearray()
    while len(buf) < n:
        _wait(fd, deadline)
        try:
            chunk = _read_fd(fd, min(n - len(buf), 1 << 20))
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            raise PeerClosed("the other process closed the connection")
        buf += chunk
    return bytes(buf)
