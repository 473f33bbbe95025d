"""`load_pickle` loads plain data and refuses anything that would run code, with one-line errors."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import pytest

from analyzers.readers.safe_pickle import load_pickle
from kvtrace.errors import KvtraceError

PLAIN = {
    "segments": [{"device": 0, "address": 1 << 40, "blocks": [{"size": 512, "state": "inactive"}]}],
    "device_traces": [[{"action": "alloc", "addr": 7, "size": 512, "frames": []}]],
    "flags": (True, False, None),
    "ratio": 0.5,
    "big": 1 << 70,
}


class _Evil:
    """Unpickling this calls `func(*args)`: the classic pickle exploit."""

    def __init__(self, func: object, args: tuple[object, ...]) -> None:
        self.func = func
        self.args = args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.func, self.args


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_plain_data_round_trips(tmp_path: Path) -> None:
    path = _write(tmp_path / "plain.pickle", pickle.dumps(PLAIN, protocol=4))
    assert load_pickle(path) == PLAIN


def test_gzip_compressed_pickle_is_detected_by_magic(tmp_path: Path) -> None:
    # GIVEN a gzipped pickle whose name does not say so
    path = _write(tmp_path / "snapshot.pickle", gzip.compress(pickle.dumps(PLAIN, protocol=5)))
    # THEN it loads like the plain one
    assert load_pickle(path) == PLAIN


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_os_system_payload_is_refused_and_never_runs(tmp_path: Path, protocol: int) -> None:
    target = tmp_path / "pwned_by_system"
    payload = pickle.dumps(_Evil(os.system, (f"touch {target}",)), protocol=protocol)
    path = _write(tmp_path / "evil.pickle", payload)

    with pytest.raises(KvtraceError) as caught:
        load_pickle(path)

    assert not target.exists()
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert "system" in message and "refused" in message
    assert "\n" not in message


@pytest.mark.parametrize("compress", [False, True])
def test_builtin_open_payload_is_refused_and_creates_no_file(tmp_path: Path, compress: bool) -> None:
    target = tmp_path / "pwned_by_open"
    payload = pickle.dumps({"segments": [_Evil(open, (str(target), "w"))]}, protocol=4)
    path = _write(tmp_path / "evil.pickle", gzip.compress(payload) if compress else payload)

    with pytest.raises(KvtraceError, match=r"(io|builtins)\.open"):
        load_pickle(path)

    assert not target.exists()


def test_protocol_zero_global_opcode_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "pwned_p0"
    # Protocol 0 has no header; build a GLOBAL + REDUCE by hand behind a protocol-2 header.
    payload = b"\x80\x02cposix\nsystem\n(V" + f"touch {target}".encode() + b"\ntR."
    path = _write(tmp_path / "p0.pickle", payload)
    with pytest.raises(KvtraceError, match=r"posix\.system"):
        load_pickle(path)
    assert not target.exists()


def test_truncated_pickle(tmp_path: Path) -> None:
    data = pickle.dumps(PLAIN, protocol=4)
    path = _write(tmp_path / "cut.pickle", data[: len(data) // 2])
    with pytest.raises(KvtraceError, match=r"truncated") as caught:
        load_pickle(path)
    assert str(caught.value).startswith(f"{path}: ")


def test_truncated_gzip_pickle(tmp_path: Path) -> None:
    data = gzip.compress(pickle.dumps(PLAIN, protocol=4))
    path = _write(tmp_path / "cut.pickle.gz", data[: len(data) - 12])
    with pytest.raises(KvtraceError, match=r"truncated") as caught:
        load_pickle(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("content", [b"", gzip.compress(b"")], ids=["plain", "gzip"])
def test_empty_file(tmp_path: Path, content: bytes) -> None:
    path = _write(tmp_path / "empty.pickle", content)
    with pytest.raises(KvtraceError, match="empty file") as caught:
        load_pickle(path)
    assert str(caught.value).startswith(f"{path}: ")


def test_wrong_format(tmp_path: Path) -> None:
    path = _write(tmp_path / "trace.json", b'{"traceEvents": []}')
    with pytest.raises(KvtraceError, match="not a pickle"):
        load_pickle(path)


def test_corrupt_pickle(tmp_path: Path) -> None:
    data = bytearray(pickle.dumps(PLAIN, protocol=4))
    data[20:40] = b"\xff" * 20
    path = _write(tmp_path / "corrupt.pickle", bytes(data))
    with pytest.raises(KvtraceError) as caught:
        load_pickle(path)
    assert str(caught.value).startswith(f"{path}: ")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KvtraceError, match="no such file"):
        load_pickle(tmp_path / "absent.pickle")


def test_progress_reaches_the_file_size(tmp_path: Path) -> None:
    path = _write(tmp_path / "plain.pickle", pickle.dumps(PLAIN))
    calls: list[tuple[int, int]] = []
    load_pickle(path, progress=lambda done, total: calls.append((done, total)))
    size = path.stat().st_size
    assert calls[0] == (0, size)
    assert calls[-1] == (size, size)


@pytest.mark.parametrize("protocol", [0, 1])
def test_a_dict_pickled_without_a_protocol_header_loads(tmp_path: Path, protocol: int) -> None:
    # Protocols 0 and 1 open with the dict itself; the loader still refuses imports in them
    path = _write(tmp_path / f"p{protocol}.pickle", pickle.dumps(PLAIN, protocol=protocol))
    assert load_pickle(path) == PLAIN
    evil_data = pickle.dumps({"x": _Evil(os.system, ("true",))}, protocol=protocol)
    evil = _write(tmp_path / "evil.pickle", evil_data)
    with pytest.raises(KvtraceError, match="refused to load"):
        load_pickle(evil)
