"""The A/B scenarios in a real VM (OVMF + GRUB + Debian kernel under QEMU TCG) on images/tiny.toml.

Releases come from the real builder (`obelisk image build`), updates are staged with the real
`obelisk update apply`, and the boots are real. Each scenario's per-boot times are printed to
the terminal (past pytest's capture) so CI logs show them.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from testlib import OBELISK, REPO, need_tools, say

from builder.imagetest import scenarios
from obelisk import signing

TINY = REPO / "images" / "tiny.toml"


_CONFIG: list[pytest.Config] = []


def _say(line: str) -> None:
    say(_CONFIG[0] if _CONFIG else None, line)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> scenarios.Context:
    _CONFIG[:] = [pytestconfig]
    need_tools("qemu-system-x86_64", "qemu-img", "mksquashfs", "veritysetup", "mcopy", "grub-mkimage", "unsquashfs")
    out = tmp_path_factory.mktemp("vm-releases")
    # One signing key and one stage cache for all three builds (module scope runs outside the
    # per-test XDG isolation, so nothing may depend on the environment's defaults).
    keydir = out / "key"
    subprocess.run([OBELISK, "key", "generate", str(keydir)], check=True, capture_output=True)
    key = keydir / "obelisk.key"
    cache = Path(os.environ.get("OBELISK_TEST_CACHE") or out / "cache")
    release = scenarios.build_release(TINY, out / "base", "0.1.0", key, _say, cache)
    work = release / "test"
    work.mkdir()
    built: dict[str, Path] = {}

    def next_release() -> Path:
        if "next" not in built:
            built["next"] = scenarios.build_release(TINY, work / "releases/next", "0.1.1", key, _say, cache)
        return built["next"]

    def broken_release() -> Path:
        if "broken" not in built:
            d = scenarios.broken_definition(TINY, work / "broken-def")
            built["broken"] = scenarios.build_release(d, work / "releases/broken", "0.1.1", key, _say, cache)
        return built["broken"]

    return scenarios.Context(release=release, work=work, boot_timeout=300.0, next_release=next_release,
                             broken_release=broken_release, obelisk=[OBELISK], log=_say,
                             signing_key=key)


@pytest.mark.vm
@pytest.mark.parametrize("name", [n for n in scenarios.SCENARIOS if n not in scenarios.HOST_IMAGE_ONLY])
def test_scenario(ctx: scenarios.Context, name: str) -> None:
    out = scenarios.run_scenario(ctx, name)
    _say(out.line())
    assert out.ok, f"{out.line()}\nlogs under {ctx.work / name}"


def test_image_test_bad_input(tmp_path: Path) -> None:
    """`obelisk image test` refuses bad input with one line and exit 2 (no VM started)."""
    cases = [
        ([str(tmp_path / "missing")], "not a release folder"),
        ([str(tmp_path), "--scenario", "nope"], "unknown scenario nope"),
    ]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "disk.raw").write_bytes(b"")
    (bad / "release.json").write_text("{not json")
    cases.append(([str(bad)], "release.json is unreadable"))
    for args, msg in cases:
        res = subprocess.run([OBELISK, "image", "test", *args], capture_output=True, text=True)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert res.stderr.startswith("error: ") and msg in res.stderr, res.stderr
        assert "Traceback" not in res.stderr


def test_broken_definition_keeps_the_rest(tmp_path: Path) -> None:
    d = scenarios.broken_definition(TINY, tmp_path)
    import tomllib

    data = tomllib.loads(d.read_text())
    orig = tomllib.loads(TINY.read_text())
    assert data["name"] == orig["name"] and data["kernel"] == orig["kernel"]
    hook = Path(data["files"][-1]) / "usr/lib/obelisk/health.d/50-broken"
    assert hook.is_file() and hook.stat().st_mode & 0o111
    assert scenarios.bump_version("0.1.9") == "0.1.10" and scenarios.bump_version("2.0.0-rc1") == "2.0.0-rc2"
    json.dumps(data)


def test_guest_test_disk(tmp_path: Path) -> None:
    """The disk that carries a command into base's guest: ext4 labelled OBELISK-TEST with run.sh and the files.

    The udev rule that reacts to it must match the same label and only virtio disks (inert otherwise).
    """
    payload = tmp_path / "update.payload"
    payload.write_bytes(b"x" * 5000)
    priv, pub = signing.generate_keypair(tmp_path / "key")
    img = scenarios.make_test_disk(tmp_path / "t.img", scenarios.GUEST_APPLY, {"update.payload": payload},
                                   {"version": "1.2.3\n"}, signing_key=priv)
    label = subprocess.run(["e2label", str(img)], capture_output=True, text=True)
    assert label.stdout.strip() == scenarios.TEST_LABEL
    listing = subprocess.run(["debugfs", "-R", "ls -l /", str(img)], capture_output=True, text=True).stdout
    assert "run.sh" in listing and "update.payload" in listing and "version" in listing
    cat = subprocess.run(["debugfs", "-R", "cat /run.sh", str(img)], capture_output=True, text=True).stdout
    assert "obelisk update apply ./update.payload" in cat
    # The guest runs run.sh only if a key it trusts signed it (obelisk-test-run checks run.sh.sig).
    sig = subprocess.run(["debugfs", "-R", "cat /run.sh.sig", str(img)], capture_output=True).stdout
    signing.verify_any([signing.load_public_key(pub)], cat.encode(), sig)
    rule = (Path(__file__).parents[2] / "images/files/base/usr/lib/udev/rules.d/90-obelisk-test.rules").read_text()
    assert f'ENV{{ID_FS_LABEL}}=="{scenarios.TEST_LABEL}"' in rule and 'KERNEL=="vd*"' in rule
