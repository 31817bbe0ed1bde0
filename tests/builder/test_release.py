"""The shared tiny release: contents, signature, GPT, slots, verity, formats; checked with real tools."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from bhelpers import Built, obelisk


def test_release_holds_every_artifact(tiny: Built) -> None:
    names = sorted(p.name for p in tiny.release.iterdir())
    assert names == sorted(["disk.raw", "disk.qcow2", "vmlinuz", "initrd", "usr.img", "update.payload",
                            "release.json", "packages.json", "SHA256SUMS", "SHA256SUMS.sig"])
    rel = tiny.release_json
    for key in ("name", "version", "build_id", "app_id", "arch", "verity_root_hash", "hash_offset", "usr_size",
                "artifacts", "inputs_digest"):
        assert key in rel, key
    assert rel["name"] == "tiny" and rel["version"] == "0.1.0"
    assert rel["hash_offset"] % 4096 == 0
    for name, art in rel["artifacts"].items():
        assert (tiny.release / name).stat().st_size == art["size"]
    assert not list(tiny.out.glob("tiny/.tmp-*")), "a temporary folder was left next to the release"


def test_verify_accepts_and_catches_tampering(tiny: Built, tmp_path: Path) -> None:
    ok = obelisk("image", "verify", tiny.release, "--key", tiny.pub)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "release verified" in ok.stdout
    copy = tmp_path / "rel"
    shutil.copytree(tiny.release, copy)
    with (copy / "usr.img").open("r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    bad = obelisk("image", "verify", copy, "--key", tiny.pub, "--json")
    assert bad.returncode == 1
    failed = [c["what"] for c in json.loads(bad.stdout)["checks"] if not c["ok"]]
    assert "usr.img" in failed
    # A key that did not sign the release.
    other = tmp_path / "k"
    obelisk("key", "generate", other, check=True)
    wrong = obelisk("image", "verify", tiny.release, "--key", other / "obelisk.pub")
    assert wrong.returncode == 1 and "BAD SHA256SUMS.sig" in wrong.stdout


def test_cgpt_and_sgdisk_accept_the_disk(tiny: Built) -> None:
    disk = tiny.release / "disk.raw"
    show = subprocess.run(["cgpt", "show", disk], capture_output=True, text=True, check=True).stdout
    for label in ("EFI-SYSTEM", "USR-A", "USR-B", "OEM", "ROOT"):
        assert f'Label: "{label}"' in show
    v = subprocess.run(["sgdisk", "-v", disk], capture_output=True, text=True)
    assert v.returncode == 0 and "No problems found" in v.stdout, v.stdout
    attr = subprocess.run(["cgpt", "show", "-i", "3", "-A", disk], capture_output=True, text=True, check=True)
    assert attr.stdout.strip() == "0x101"  # USR-A: P=1 T=0 S=1
    attr_b = subprocess.run(["cgpt", "show", "-i", "4", "-A", disk], capture_output=True, text=True, check=True)
    assert int(attr_b.stdout.strip(), 0) == 0


def test_boot_status_shows_usr_a_bootable(tiny: Built, tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    shutil.copyfile(tiny.release / "disk.raw", disk)  # boot commands may reconcile: never touch the release
    st = json.loads(obelisk("boot", "status", "--disk", disk, "--json", check=True).stdout)
    by_index = {s["index"]: s for s in st["slots"]}
    assert (by_index[3]["priority"], by_index[3]["tries"], by_index[3]["successful"]) == (1, 0, True)
    assert (by_index[4]["priority"], by_index[4]["successful"]) == (0, False)
    assert st["next"] == 3


def test_veritysetup_verifies_usr_a_against_release_hash(tiny: Built, tmp_path: Path) -> None:
    rel = tiny.release_json
    part = rel["partitions"]["USR-A"]
    slot = tmp_path / "usr-a.img"
    with (tiny.release / "disk.raw").open("rb") as f, slot.open("wb") as g:
        f.seek(part["offset"])
        g.write(f.read(part["size"]))
    subprocess.run(["veritysetup", "verify", f"--hash-offset={rel['hash_offset']}", slot, slot,
                    rel["verity_root_hash"]], check=True, capture_output=True)
    # And the hash really binds the content: one flipped byte in the filesystem is caught.
    with slot.open("r+b") as g:
        g.seek(8192)
        b = g.read(1)
        g.seek(8192)
        g.write(bytes([b[0] ^ 0xFF]))
    bad = subprocess.run(["veritysetup", "verify", f"--hash-offset={rel['hash_offset']}", slot, slot,
                          rel["verity_root_hash"]], capture_output=True)
    assert bad.returncode != 0


def test_inspect_json_reports_slots_and_versions(tiny: Built) -> None:
    info = json.loads(obelisk("image", "inspect", tiny.release, "--json", check=True).stdout)
    assert info["release"]["version"] == "0.1.0"
    slots = {s["name"]: s for s in info["disk"]["slots"]}
    assert slots["A"]["bootable"] and not slots["B"]["bootable"]
    assert slots["A"]["root_hash"] == tiny.release_json["verity_root_hash"]
    assert info["disk"]["disk_guid"] == "00000000-0000-0000-0000-000000000001"
    bad = obelisk("image", "inspect", tiny.release / "nope.raw")
    assert bad.returncode == 2 and bad.stderr.startswith("error:")


def test_qcow2_has_the_same_content_as_raw(tiny: Built) -> None:
    cmp = subprocess.run(["qemu-img", "compare", tiny.release / "disk.raw", tiny.release / "disk.qcow2"],
                         capture_output=True, text=True)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


def test_pxe_initrd_carries_usr(tiny: Built) -> None:
    initrd = (tiny.release / "initrd").read_bytes()
    usr = (tiny.release / "usr.img").read_bytes()
    at = initrd.find(b"070701", 8)
    while at != -1 and initrd[at + 110: at + 110 + 7] != b"usr.img":
        at = initrd.find(b"070701", at + 1)
    assert at != -1 and at % 4 == 0, "no aligned newc entry named usr.img after the initramfs"
    size = int(initrd[at + 54: at + 62], 16)
    start = at + 110 + 8
    start += (4 - start % 4) % 4
    assert size == len(usr) and initrd[start:start + size] == usr
    assert (tiny.release / "vmlinuz").read_bytes()[:2] == b"MZ"


def test_image_identity_inside_usr(tiny: Built, tmp_path: Path) -> None:
    """os-release, release file, keys and the boot files are inside the squashfs (unsquashfs reads it)."""
    dest = tmp_path / "x"
    subprocess.run(["unsquashfs", "-q", "-n", "-d", dest, tiny.release / "usr.img", "lib/os-release",
                    "share/obelisk", "lib/obelisk/boot"], check=True, capture_output=True)
    osr = (dest / "lib/os-release").read_text()
    assert "ID=obelisk" in osr and "VERSION_ID=0.1.0" in osr and f"BUILD_ID={tiny.release_json['build_id']}" in osr
    rel = (dest / "share/obelisk/release").read_text()
    assert "VERSION=0.1.0" in rel and "APPID=" in rel and "NAME=tiny" in rel
    keys = list((dest / "share/obelisk/keys").glob("*.pub"))
    assert [k.read_bytes() for k in keys] == [tiny.pub.read_bytes()]
    assert (dest / "lib/obelisk/boot/vmlinuz").stat().st_size > 1_000_000
    assert (dest / "lib/obelisk/boot/initrd.img").read_bytes()[:2] == b"\x1f\x8b"
