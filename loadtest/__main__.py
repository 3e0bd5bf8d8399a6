"""``python -m guildcast.loadtest SCENARIO|COMMAND [options]``: see ``loadtest/README.md``."""

from __future__ import annotations

import sys

from guildcast.loadtest.cli import main

if __name__ == "__main__":
    sys.exit(main())
