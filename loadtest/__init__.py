"""Guildcast load-test harness: drive a server hard and show what it does.

A product of its own (``guildcast loadtest`` / ``python -m loadtest``): it
speaks the gateway protocol by hand (``loadtest.wire``), runs many cheap
subscribers per worker (``loadtest.fleet``), publishes over the gateway or
HTTP (``loadtest.publish``), starts or targets a server
(``loadtest.target``) and measures it (``loadtest.monitor``,
``loadtest.runner``). It imports the server only to embed it
(``from server import Server, Config``). See ``loadtest/README.md``.
"""
