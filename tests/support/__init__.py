"""The helpers every test shares, one module per job.

- :mod:`tests.support.wait`: :data:`~tests.support.wait.TIMEOUT` and
  :func:`~tests.support.wait.until`, the one bounded wait on a condition;
- :mod:`tests.support.node`: a node to test against: embedded in the test's
  process (with or without its HTTP API, restartable on its port), or a
  real ``guildcast serve`` process (also a cluster node over Redis);
- :mod:`tests.support.gateway`: a plain ``websockets`` client of the
  gateway (open, identify, subscribe, send and receive JSON, expect a
  close), and the cluster tests' recovering follower and publisher;
- :mod:`tests.support.api`: an HTTP client of a node's API;
- :mod:`tests.support.redis`: a real ``redis-server`` on a free port.

The frame-level clients stay beside the tests that own them
(``tests/protocol/framing.py``, ``tests/integration/raw.py``,
``tests/hardening/support.py``).
"""
