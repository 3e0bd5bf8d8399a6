"""First-run state: the generated secret and API key, kept across restarts.

``guildcast serve`` with no ``--secret`` (the embedded default) generates a
secret, and without ``--api-key`` an API key; this module keeps them in a
small JSON file so that a restart signs and accepts the
same tokens and keys (the demo board's tabs reconnect instead of ending at
4004). A production deployment passes its own ``--secret`` and
``--api-key`` and never reads or writes the file.

Where: ``--state-file PATH`` (env ``GUILDCAST_STATE_FILE``) if given, else
``DATA_DIR/guildcast-state.json`` with ``--data-dir``, else
``$XDG_STATE_HOME/guildcast/state.json`` (``~/.local/state/guildcast/state.json``
when ``XDG_STATE_HOME`` is unset). The file is created with mode 0600 in a
directory created with mode 0700, and written whole to a temporary file then
renamed, so a crash never leaves half a file. Consistency model: one writer
at a time (the node or the ``--workers`` supervisor at start); two first
starts racing may each generate a value, and the last rename wins.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

#: The state file's name inside ``--data-dir``.
DATA_DIR_NAME = "guildcast-state.json"
#: Bytes of randomness of a generated secret: 32, the HS256 key size PyJWT
#: asks for (a shorter key makes it warn on every token).
SECRET_BYTES = 32
#: Bytes of randomness of a generated API key.
API_KEY_BYTES = 24


class StateError(Exception):
    """The state file cannot be read or written (one line for the operator)."""


@dataclass(frozen=True, slots=True)
class State:
    """What the state file holds."""

    path: Path
    secret: str
    api_key: str


def default_path(data_dir: str | None, env: dict[str, str] | None = None) -> Path:
    """Where the state file lives when ``--state-file`` is not given."""
    env = dict(os.environ) if env is None else env
    if data_dir:
        return Path(data_dir) / DATA_DIR_NAME
    base = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "guildcast" / "state.json"


def read(path: Path) -> dict[str, str]:
    """The file's values (empty when it does not exist yet)."""
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise StateError(f"cannot read the state file {path}: {e.strerror}") from None
    try:
        doc = json.loads(raw)
    except ValueError:
        raise StateError(f"the state file {path} is not JSON: remove it to start anew") from None
    if not isinstance(doc, dict):
        raise StateError(f"the state file {path} is not a JSON object: remove it")
    return {k: v for k, v in doc.items() if isinstance(k, str) and isinstance(v, str) and v}


def load_or_create(path: Path) -> State:
    """The kept secret and API key, generating and writing what is missing."""
    values = read(path)
    changed = False
    if "secret" not in values:
        values["secret"] = secrets.token_urlsafe(SECRET_BYTES)
        changed = True
    if "api_key" not in values:
        values["api_key"] = secrets.token_urlsafe(API_KEY_BYTES)
        changed = True
    try:
        if changed:
            _write(path, values)
        elif stat.S_IMODE(path.stat().st_mode) & 0o077:
            path.chmod(0o600)  # a copy or an editor widened it: the secret is not for others
    except OSError as e:
        raise StateError(f"cannot write the state file {path}: {e.strerror}") from None
    return State(path, values["secret"], values["api_key"])


def _write(path: Path, values: dict[str, str]) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(values, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
