"""Settings parse every variable once and name the one that is wrong."""

from __future__ import annotations

import pytest

from pipelines.errors import ConfigError
from pipelines.secrets import Secret
from service.settings import Settings


def test_defaults() -> None:
    """With nothing set: loopback, SQLite under .wavechain, real provider URLs."""
    s = Settings.from_env({})
    assert s.base_url == "http://127.0.0.1:8000"
    assert s.database_url == "sqlite:///./.wavechain/state.db"
    assert s.wavespeed_api_key is None and s.webhook_secrets == ()


def test_everything_parsed() -> None:
    """Each documented variable lands in its field; secrets are wrapped."""
    s = Settings.from_env({
        "PUBLIC_BASE_URL": "https://hooks.example.com/", "WAVESPEED_API_KEY": " k ",
        "WAVESPEED_WEBHOOK_SECRETS": "whsec_a, whsec_b", "WEBHOOK_TOLERANCE_S": "60",
        "MAX_WEBHOOK_BYTES": "2048", "DATABASE_URL": "sqlite:////tmp/x.db",
        "WAVECHAIN_PORT": "9000", "WAVECHAIN_WORKERS": "3",
    })  # fmt: skip
    assert s.base_url == "https://hooks.example.com"
    assert s.wavespeed_api_key == Secret("k")
    assert s.webhook_secrets == (Secret("whsec_a"), Secret("whsec_b"))
    assert (s.webhook_tolerance_s, s.max_webhook_bytes, s.port, s.workers) == (60, 2048, 9000, 3)
    assert "whsec_a" not in repr(s) and "'k'" not in repr(s)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"WAVECHAIN_PORT": "x"}, "WAVECHAIN_PORT must be an integer"),
        ({"WAVECHAIN_PORT": "70000"}, "WAVECHAIN_PORT must be in range"),
        ({"PUBLIC_BASE_URL": "hooks.example.com"}, "PUBLIC_BASE_URL must be an absolute"),
        ({"WAVESPEED_BASE_URL": "ftp://x"}, "WAVESPEED_BASE_URL must be an absolute"),
        ({"WAVESPEED_WEBHOOK_SECRETS": " , "}, "WAVESPEED_WEBHOOK_SECRETS: no secret"),
        ({"WAVESPEED_WEBHOOK_SECRETS": "whsec_a,whsec_"}, "empty after its whsec_ prefix"),
        ({"DATABASE_URL": "postgresql:///db"}, "names its host"),
        ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL must be sqlite"),
        ({"WEBHOOK_TOLERANCE_S": "0"}, "WEBHOOK_TOLERANCE_S must be in range"),
    ],
)
def test_bad_values_named(env: dict[str, str], named: str) -> None:
    """A bad value raises ConfigError naming the variable."""
    with pytest.raises(ConfigError, match=named):
        Settings.from_env(env)


MOUNTS = """overlay / overlay rw 0 0
proc /proc proc rw 0 0
fs1:/export /var/lib/wavechain nfs4 rw 0 0
/dev/sda1 /var/lib/wavechain/local ext4 rw 0 0
"""


@pytest.mark.parametrize(
    ("path", "refused"),
    [
        ("/var/lib/wavechain/state.db", True),  # on the NFS mount
        ("/var/lib/wavechain/local/state.db", False),  # a local disk mounted inside it
        ("/srv/state.db", False),
        ("/var/lib/wavechainx/state.db", False),  # a sibling, not inside the mount
    ],
)
def test_a_sqlite_file_on_a_network_filesystem_is_refused(path: str, refused: bool) -> None:
    """Several pods never share one SQLite file: a network filesystem is refused, naming
    it and PostgreSQL; a local one is fine."""
    from pipelines.store.sqlite import refuse_network_filesystem

    if refused:
        with pytest.raises(ConfigError, match=r"network filesystem \(nfs4\).*PostgreSQL"):
            refuse_network_filesystem(path, MOUNTS)
    else:
        refuse_network_filesystem(path, MOUNTS)
