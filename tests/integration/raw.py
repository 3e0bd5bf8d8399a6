"""A raw TCP WebSocket client: the handshake typed by hand, frames built with
websockets' own ``Frame`` (masked, as RFC 6455 requires of clients) and read
with the protocol package's parser.

For what a well-behaved client library will not do: stop reading with a tiny
receive buffer (slow consumer), send fragmented or odd frames, speak plain
HTTP to the gateway.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
from typing import Any

import orjson
from websockets.frames import Frame, Opcode

from guildcast.protocol.frames import parse_frames
from tests.support.wait import TIMEOUT


class RawWs:
    """One TCP connection; ``buf`` holds bytes read but not yet parsed."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.buf = bytearray()

    @classmethod
    async def open(cls, port: int, rcvbuf: int | None = None) -> RawWs:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            # Before connect, so the advertised window is small from the start.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        async with asyncio.timeout(TIMEOUT):
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        return cls(sock)

    async def sendall(self, data: bytes) -> None:
        async with asyncio.timeout(TIMEOUT):
            await self.loop.sock_sendall(self.sock, data)

    async def recv_some(self, n: int = 65536) -> bytes:
        async with asyncio.timeout(TIMEOUT):
            return await self.loop.sock_recv(self.sock, n)

    async def http_response(self) -> tuple[int, bytes]:
        """Read one HTTP response head; returns (status, head). The rest stays in buf."""
        while b"\r\n\r\n" not in self.buf:
            chunk = await self.recv_some()
            if not chunk:
                break
            self.buf += chunk
        head, sep, rest = bytes(self.buf).partition(b"\r\n\r\n")
        assert sep, f"no HTTP response head: {bytes(self.buf)!r}"
        self.buf = bytearray(rest)
        status = int(head.split(b" ", 2)[1])
        return status, head

    async def handshake(self, path: str = "/gateway") -> int:
        key = base64.b64encode(os.urandom(16)).decode()
        await self.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        status, _head = await self.http_response()
        return status

    async def send_frame(self, opcode: Opcode, payload: bytes, fin: bool = True) -> None:
        await self.sendall(Frame(opcode, payload, fin=fin).serialize(mask=True))

    async def send_json(self, obj: Any) -> None:
        await self.send_frame(Opcode.TEXT, orjson.dumps(obj))

    def frames(self, limit: int | None = None) -> list[tuple[int, bytes]]:
        """Parse and remove complete (unmasked) server frames from ``buf``:
        all of them, or the first ``limit``."""
        buf = self.buf
        frames, end, err = parse_frames(buf, 0, limit)
        assert err is None, err
        del buf[:end]
        return [(opcode, payload) for opcode, _fin, payload in frames]

    async def read_until_close(self) -> tuple[int | None, list[tuple[int, bytes]]]:
        """Read frames until a close frame or EOF; returns (close code, frames before)."""
        seen: list[tuple[int, bytes]] = []
        while True:
            for opcode, payload in self.frames():
                if opcode == Opcode.CLOSE.value:
                    code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                    return code, seen
                seen.append((opcode, payload))
            try:
                chunk = await self.recv_some()
            except ConnectionError:
                return None, seen
            if not chunk:
                return None, seen
            self.buf += chunk

    async def next_json(self) -> dict[str, Any]:
        """The next text frame as JSON."""
        while True:
            fs = self.frames(limit=1)
            if fs:
                ((opcode, payload),) = fs
                assert opcode == Opcode.TEXT.value, (opcode, payload)
                msg = orjson.loads(payload)
                assert isinstance(msg, dict)
                return msg
            chunk = await self.recv_some()
            assert chunk, "connection closed"
            self.buf += chunk

    def close(self) -> None:
        self.sock.close()
