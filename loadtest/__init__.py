"""Guildcast load-test harness: drive a server hard and show what it does.

A product of its own (``guildcast loadtest`` / ``python -m guildcast.loadtest``): it
speaks the gateway protocol with ``guildcast.protocol`` (``guildcast.loadtest.wire``),
runs many cheap subscribers per worker (``guildcast.loadtest.fleet``), publishes over the gateway or
HTTP (``guildcast.loadtest.publish``), starts or targets a server
(``guildcast.loadtest.target``) and measures it (``guildcast.loadtest.monitor``,
``guildcast.loadtest.runner``). It imports the server only to embed it
(``from guildcast import Server, Config``). See ``loadtest/README.md``.
"""
