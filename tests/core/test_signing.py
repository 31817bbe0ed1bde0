"""obelisk/signing.py and `obelisk key generate|sign|verify`, run for real."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from obelisk import signing


def test_key_generate_and_sign(tmp_path: Path, obelisk_bin: str) -> None:
    out = subprocess.run([obelisk_bin, "key", "generate", str(tmp_path / "k")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    priv = tmp_path / "k" / "obelisk.key"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    key = signing.load_private_key(priv)
    pub = signing.load_public_key(tmp_path / "k" / "obelisk.pub")
    sig = signing.sign(key, b"data")
    assert signing.verify_any([pub], b"data", sig) == pub
    with pytest.raises(signing.SigningError):
        signing.verify_any([pub], b"datA", sig)
    again = subprocess.run([obelisk_bin, "key", "generate", str(tmp_path / "k")], capture_output=True, text=True)
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "Traceback" not in again.stderr


BAD_KEYS = [b"", b"garbage", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"]


@pytest.mark.parametrize("content", BAD_KEYS)
def test_bad_private_key_is_one_clear_error(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "bad.key"
    p.write_bytes(content)
    with pytest.raises(signing.SigningError, match="obelisk key generate"):
        signing.load_private_key(p)


def test_key_sign_and_verify(tmp_path: Path, obelisk_bin: str) -> None:
    """`obelisk key sign/verify`: what the base image's test hook uses to refuse an unsigned run.sh."""
    subprocess.run([obelisk_bin, "key", "generate", str(tmp_path / "k")], check=True, capture_output=True)
    subprocess.run([obelisk_bin, "key", "generate", str(tmp_path / "other")], check=True, capture_output=True)
    f = tmp_path / "run.sh"
    f.write_text("echo hi\n")
    signed = subprocess.run([obelisk_bin, "key", "sign", str(f), "--key", str(tmp_path / "k/obelisk.key")],
                            capture_output=True, text=True)
    assert signed.returncode == 0 and (tmp_path / "run.sh.sig").stat().st_size == 64

    def verify(*keys: str) -> subprocess.CompletedProcess[str]:
        args = [a for k in keys for a in ("--key", str(tmp_path / k / "obelisk.pub"))]
        return subprocess.run([obelisk_bin, "key", "verify", str(f), *args], capture_output=True, text=True)

    assert verify("k").returncode == 0
    assert verify("other", "k").returncode == 0  # any trusted key will do (rotation)
    refused = verify("other")
    assert refused.returncode == 1 and refused.stderr.startswith("error: ") and "Traceback" not in refused.stderr
    f.write_text("echo evil\n")
    assert verify("k").returncode == 1
