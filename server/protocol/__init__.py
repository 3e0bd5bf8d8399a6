"""Gateway protocol, Sans-I/O: opcodes and close codes, the id grammar and the
envelope codec, WebSocket frames, the token bucket, the server's session state
machine and the client's. Bytes and messages in, messages and effects out; no
asyncio and no sockets here (docs/DESIGN.md, "Layers")."""
