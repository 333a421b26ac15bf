"""Loaded at start-up by a Python process whose path includes this folder (tests set PYTHONPATH):
records every network connection attempt and every name lookup the process makes, as JSON lines
in the file named by NETWATCH_LOG. The attempt still goes ahead: the test judges the record."""

import json
import os
import socket
import threading

_LOG = os.environ.get("NETWATCH_LOG")


def _record(kind: str, target: object) -> None:
    line = json.dumps({"kind": kind, "target": repr(target)}) + "\n"
    with _lock, open(_LOG, "a", encoding="utf-8") as log:  # type: ignore[arg-type]
        log.write(line)


if _LOG:
    _lock = threading.Lock()
    _connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo
    _gethostbyname = socket.gethostbyname

    def connect(self: socket.socket, address: object) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _record("connect", address)
        return _connect(self, address)

    def connect_ex(self: socket.socket, address: object) -> int:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _record("connect", address)
        return _connect_ex(self, address)

    def getaddrinfo(host: object, *args: object, **kwargs: object) -> list:
        _record("lookup", host)
        return _getaddrinfo(host, *args, **kwargs)  # type: ignore[arg-type]

    def gethostbyname(host: str) -> str:
        _record("lookup", host)
        return _gethostbyname(host)

    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
    socket.getaddrinfo = getaddrinfo
    socket.gethostbyname = gethostbyname
    _record("loaded", os.getpid())  # proof that the recorder is in place
