"""A slowloris attacker and a request burst against a real HTTP port (tests and bench/).

`Slowloris` keeps `count` half-open connections to a server: a third send half a request line, a
third a request line and half a header, a third nothing at all. With `reopen`, a connection the
server closes is opened again at once, as an attacker would, so the count holds for as long as it
runs. `burst` sends `count` complete requests at once and reads every answer.
"""

from __future__ import annotations

import contextlib
import resource
import selectors
import socket
import threading
import time
from collections import Counter

PARTIALS = (
    b"GET /healthz HT",  # half a request line
    b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ",  # half a header
    b"",  # idle: connected, nothing sent
)


def raise_fd_limit(needed: int) -> None:
    """Raise this process's soft descriptor limit to `needed` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        top = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))


class Slowloris:
    """`count` half-open connections to `address`, kept open (or re-opened) by a thread.

    Connects do not block (a server with a short accept queue makes them slow), so the attack is
    under way as soon as the `with` block starts; `wait_open` waits until all are connected.
    """

    def __init__(self, address: tuple[str, int], count: int, reopen: bool = True) -> None:
        self.address = address
        self.count = count
        self.reopen = reopen
        self.opened = 0  # connected and partial request sent
        self.closed_by_server = 0
        self.answered = 0  # closed with an answer (a 503) rather than silently
        self._open = 0
        self._selector = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slowloris", daemon=True)

    def __enter__(self) -> Slowloris:
        self._thread.start()
        self._started.wait(60)
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()

    @property
    def open(self) -> int:
        """Connections connected, partial request sent, not closed by the server."""
        return self._open  # a counter: the selector's map changes under another thread

    def wait_open(self, deadline: float = 30.0) -> bool:
        end = time.monotonic() + deadline
        while self.open < self.count:
            if time.monotonic() > end:
                return False
            time.sleep(0.02)
        return True

    def _connect(self, n: int) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.connect_ex(self.address)
        self._selector.register(sock, selectors.EVENT_WRITE, n)

    def _connected(self, key: selectors.SelectorKey) -> None:
        sock: socket.socket = key.fileobj  # type: ignore[assignment]
        partial = PARTIALS[key.data % len(PARTIALS)]
        try:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                raise OSError("connect failed")
            if partial:
                sock.send(partial)
        except OSError:
            self._reopen(key)
            return
        self._selector.modify(sock, selectors.EVENT_READ, key.data)
        self.opened += 1
        self._open += 1

    def _run(self) -> None:
        for n in range(self.count):
            self._connect(n)
        self._started.set()
        while not self._stop.is_set():
            for key, _events in self._selector.select(0.1):
                if key.events == selectors.EVENT_WRITE:
                    self._connected(key)
                else:
                    self._on_readable(key)

    def _on_readable(self, key: selectors.SelectorKey) -> None:
        sock: socket.socket = key.fileobj  # type: ignore[assignment]
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self.answered += bool(data)
        self.closed_by_server += 1
        self._open -= 1
        self._reopen(key)

    def _reopen(self, key: selectors.SelectorKey) -> None:
        self._selector.unregister(key.fileobj)
        key.fileobj.close()  # type: ignore[union-attr]
        if self.reopen and not self._stop.is_set():
            with contextlib.suppress(OSError):
                self._connect(key.data)


def closed_by_peer(sock: socket.socket) -> bool:
    """The server closed `sock` (EOF or reset) without sending anything."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def burst(
    address: tuple[str, int], count: int, path: str = "/healthz", timeout: float = 30.0
) -> Counter[int]:
    """Send `count` requests at once (all connected and sent before any answer is read)."""
    request = f"GET {path} HTTP/1.0\r\nHost: {address[0]}\r\n\r\n".encode()
    socks = []
    statuses: Counter[int] = Counter()
    try:
        for _ in range(count):
            sock = socket.create_connection(address, timeout=timeout)
            sock.sendall(request)
            socks.append(sock)
        for sock in socks:
            statuses[_status_of(sock, time.monotonic() + timeout)] += 1
    finally:
        for sock in socks:
            sock.close()
    return statuses


def _status_of(sock: socket.socket, deadline: float) -> int:
    """The status code of the answer on `sock`; 0 when it closed without one."""
    data = b""
    while b"\r\n" not in data:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(4096)
        except OSError:
            return 0
        if not chunk:
            return 0
        data += chunk
    return int(data.split(b" ", 2)[1])
