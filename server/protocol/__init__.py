"""Gateway protocol, Sans-I/O: opcodes, close codes, the envelope codec and the
session state machine. Bytes and messages in, messages and effects out; no
asyncio and no sockets here (DESIGN.md, "Layers")."""
