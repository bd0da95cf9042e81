"""A loopback TCP proxy that injects network faults between a client and a server.

Tests point a client (boto3) at ``FaultProxy.url`` instead of the server, then cut the
connections at chosen moments: all at once (``cut``), for a while (``cut_for``), after a
number of uploaded bytes (``cut_after``) or when a chosen request goes by (``cut_when``).
A cut resets every open connection (RST, via SO_LINGER 0) and resets new ones as soon as
they are accepted, until ``restore``. Standard library only; two threads per connection.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable

CHUNK = 65536  # bytes read per recv(); what a ``cut_when`` predicate sees at most
_LINGER_0 = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, not FIN

Pair = tuple[socket.socket, socket.socket]  # (client side, upstream side)


def _set_rst(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_0)


class FaultProxy:
    """Forward 127.0.0.1:``port`` to ``upstream_host:upstream_port``, with faults on demand.

    Counters (ints, read them any time): ``bytes_up`` (bytes forwarded client->upstream),
    ``bytes_down`` (bytes forwarded upstream->client), ``connections`` (accepted in total,
    reset ones included). Every control is thread-safe and works during transfers.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)  # seconds: how often the accept loop checks stop()
        self.port: int = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.bytes_up = self.bytes_down = self.connections = 0
        self._lock = threading.Lock()
        self._open: set[Pair] = set()  # forwarding; a cut empties it
        self._threads: set[threading.Thread] = set()  # one per connection (joins its pump)
        self._cut = threading.Event()  # set while cut
        self._stopping = threading.Event()
        self._budget: int | None = None  # bytes up still allowed before cut_after fires
        self._predicate: Callable[[bytes], bool] | None = None
        self._timer: threading.Timer | None = None
        self._acceptor = threading.Thread(target=self._accept_loop, name="faultproxy-accept")

    def start(self) -> FaultProxy:
        """Start accepting connections; returns self."""
        self._acceptor.start()
        return self

    def stop(self) -> None:
        """Reset every connection, stop listening and join every thread of the proxy."""
        self._stopping.set()
        self._cancel_timer(join=True)
        self.cut()
        if self._acceptor.is_alive():
            self._acceptor.join()
        self._listener.close()
        # A connection thread registered while the acceptor wound down is joined too; on a
        # loaded machine one join round of 5 s was not always enough (seen in a full run).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with self._lock:
                threads = [t for t in self._threads if t.is_alive()]
            if not threads:
                break
            for thread in threads:
                thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def cut(self) -> None:
        """Reset every open connection now and reset new ones until ``restore()``.
        An armed ``cut_after``/``cut_when`` trigger stays armed."""
        with self._lock:
            self._cut.set()
            pairs, self._open = self._open, set()
        for pair in pairs:  # wake both pumps; the connection's thread then closes (RST)
            for sock in pair:
                _set_rst(sock)
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RD)  # sends nothing; recv() returns b""

    def restore(self) -> None:
        """Accept and forward again (cancels a pending ``cut_for`` timer)."""
        self._cancel_timer()
        self._cut.clear()

    def cut_for(self, seconds: float) -> None:
        """Cut now and restore after ``seconds`` (a timer), like a short server restart."""
        self._cancel_timer()
        self.cut()
        timer = threading.Timer(seconds, self.restore)
        timer.daemon, timer.name = True, "faultproxy-timer"
        with self._lock:
            self._timer = timer
        timer.start()

    def cut_after(self, upstream_bytes: int) -> None:
        """Arm a cut that fires once ``upstream_bytes`` more bytes (all connections
        together, counted from now) went client->upstream. Exactly that many get through."""
        with self._lock:
            self._budget = upstream_bytes

    def cut_when(self, predicate: Callable[[bytes], bool]) -> None:
        """Arm a cut that fires on the first client->upstream chunk (at most ``CHUNK``
        bytes, as received) for which ``predicate(chunk)`` is true. That chunk is dropped,
        so the upstream never sees it; earlier chunks were forwarded."""
        with self._lock:
            self._predicate = predicate

    def disarm(self) -> None:
        """Forget an armed ``cut_after``/``cut_when`` trigger that has not fired."""
        with self._lock:
            self._budget = self._predicate = None

    @property
    def is_cut(self) -> bool:
        """True while the proxy is cut."""
        return self._cut.is_set()

    def wait_cut(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for the proxy to be cut (by a trigger or a call);
        returns whether it is."""
        return self._cut.wait(timeout)

    def _cancel_timer(self, join: bool = False) -> None:
        with self._lock:
            timer, self._timer = self._timer, None
        if timer is not None and timer is not threading.current_thread():
            timer.cancel()
            if join:
                timer.join()

    def _fire(self) -> None:
        """A trigger fired: disarm it and cut."""
        self.disarm()
        self.cut()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(
                target=self._serve, args=(client,), name="faultproxy-conn", daemon=True
            )
            with self._lock:
                self.connections += 1
                self._threads.add(thread)
            thread.start()

    def _serve(self, client: socket.socket) -> None:
        """Own one connection: connect upstream, pump both ways, close both sockets."""
        upstream: socket.socket | None = None
        try:
            client.settimeout(None)
            if self.is_cut:
                return
            upstream = socket.create_connection(self.upstream, timeout=5)
            upstream.settimeout(None)
            pair = (client, upstream)
            with self._lock:
                if self._cut.is_set():
                    return
                self._open.add(pair)
            down = threading.Thread(target=self._pump, args=(pair, False), name="faultproxy-down")
            down.start()
            self._pump(pair, True)
            down.join()
        except OSError:
            pass
        finally:
            with self._lock:
                reset = self._cut.is_set()
                if upstream is not None:
                    self._open.discard((client, upstream))
                # Stays in _threads: stop() joins it, even past this line (closing its
                # sockets; a thread that took itself out here was seen alive after stop()).
            for sock in (client, upstream):
                if sock is not None:
                    if reset:
                        _set_rst(sock)
                    sock.close()

    def _pump(self, pair: Pair, up: bool) -> None:
        """Copy one direction of ``pair`` (client->upstream if ``up``) until EOF or a cut;
        pass a clean EOF on (half-close)."""
        src, dst = pair if up else pair[::-1]
        try:
            while (data := src.recv(CHUNK)) and pair in self._open:
                if up and not (data := self._admit(data)):
                    break
                dst.sendall(data)
                with self._lock:
                    if up:
                        self.bytes_up += len(data)
                    else:
                        self.bytes_down += len(data)
                if up and self._budget == 0:  # forwarded exactly the armed byte count
                    self._fire()
            if pair in self._open:
                dst.shutdown(socket.SHUT_WR)
                return
        except OSError:
            pass
        # Cut or broken: wake the other pump (it reads from dst) so that it ends too.
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_RD)

    def _admit(self, data: bytes) -> bytes:
        """Apply armed triggers to a client->upstream chunk; return what may be forwarded
        (empty when a trigger fired and the proxy is now cut)."""
        predicate = self._predicate
        hit = predicate is not None and predicate(data)
        with self._lock:
            fire = hit and self._predicate is predicate
            if not fire and self._budget is not None:
                data = data[: self._budget]
                self._budget -= len(data)
                fire = not data
        if fire:
            self._fire()
            return b""
        return data
