"""A TCP forwarder on 127.0.0.1 that can be taken down and brought back (a server outage),
slowed to a byte rate (a slow server), or made to answer each request late (a distant server),
without touching the shared server behind it; it can also keep what clients sent (their requests
as the server saw them)."""

from __future__ import annotations

import socket
import threading


class Proxy:
    def __init__(self, target_port: int, host: str = "127.0.0.1", rate: float | None = None,
                 record: bool = False):
        self.target = (host, target_port)
        self.sent: bytearray | None = bytearray() if record else None  # what clients sent, when recording
        self.rate = rate  # bytes/s from the server, per connection; None: as fast as it comes
        self.delay = 0.0  # seconds each chunk from the client (a request) waits before it goes on
        self.host = host
        probe = socket.socket()
        probe.bind((host, 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.up()

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def up(self) -> None:
        """Listen again on the same port."""
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, self.port))
        s.listen(64)
        self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def down(self) -> None:
        """Refuse new connections and cut every open one, as a dead server would."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            try:  # wakes the thread blocked in accept(), which keeps the socket listening otherwise
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    server.close()
                    return
                self._conns += [client, server]
            for a, b, slow in ((client, server, False), (server, client, True)):
                threading.Thread(target=self._pipe, args=(a, b, slow), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, slow: bool) -> None:
        import time

        try:
            while data := src.recv(1 << 16):
                if not slow and self.sent is not None:
                    with self._lock:
                        self.sent += data
                if not slow and self.delay:
                    time.sleep(self.delay)
                if slow and self.rate:
                    time.sleep(len(data) / self.rate)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.down()
