"""Datasources against loopback HTTP servers (EC2 IMDSv2, URL) and directories (config-drive, NoCloud)."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cloudconfig.cli import app
from cloudconfig.datasources import DatasourceError, Settings, cmdline_url, fetch

USERDATA = b"#cloud-config\nhostname: from-$private_ipv4\nwrite_files:\n  - path: /etc/ip\n    content: $private_ipv4\n"
runner = CliRunner()


class Imds:
    """A small EC2 instance-metadata service: IMDSv2 tokens (or v1 only), scripted 5xx failures."""

    def __init__(self, v2: bool = True, fail_first: int = 0, userdata: bytes = USERDATA) -> None:
        self.v2, self.fail_first, self.userdata = v2, fail_first, userdata
        self.requests: list[tuple[str, str, str | None]] = []
        self.token = "tok-123"
        self.files = {
            "meta-data/instance-id": b"i-0123456789",
            "meta-data/local-hostname": b"ip-10-1-2-3.ec2.internal",
            "meta-data/local-ipv4": b"10.1.2.3",
            "meta-data/public-ipv4": b"203.0.113.7",
            "meta-data/public-keys/": b"0=laptop\n1=ci",
            "meta-data/public-keys/0/openssh-key": b"ssh-ed25519 AAAAlaptop laptop",
            "meta-data/public-keys/1/openssh-key": b"ssh-ed25519 AAAAci ci",
        }

    def handler(self) -> type[BaseHTTPRequestHandler]:
        imds = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def _send(self, code: int, body: bytes = b"") -> None:
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
                imds.requests.append(("PUT", self.path, self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")))
                if not imds.v2:
                    return self._send(405)
                if self.path != "/latest/api/token" or not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    return self._send(400)
                self._send(200, imds.token.encode())

            def do_GET(self) -> None:  # noqa: N802
                tok = self.headers.get("X-aws-ec2-metadata-token")
                imds.requests.append(("GET", self.path, tok))
                if imds.fail_first > 0:
                    imds.fail_first -= 1
                    return self._send(503)
                if imds.v2 and tok != imds.token:
                    return self._send(401)
                path = self.path.removeprefix("/latest/")
                if path == "user-data":
                    return self._send(200, imds.userdata)
                if path in imds.files:
                    return self._send(200, imds.files[path])
                self._send(404)

        return H


def _nothing(tmp_path: Path, **kw: object) -> Settings:
    """Settings where every source is empty unless the test fills it in."""
    cmd = tmp_path / "cmdline"
    if not cmd.exists():
        cmd.write_text("BOOT_IMAGE=/vmlinuz console=ttyS0\n")
    base = dict(cmdline=cmd, configdrive_dirs=(), nocloud_dirs=(), by_label=tmp_path / "no-labels",
                ec2_endpoint="http://127.0.0.1:9", timeout=2.0, attempts=1, backoff=0.01)
    base.update(kw)
    return Settings(**base)  # type: ignore[arg-type]


def test_ec2_imdsv2_token_flow(serve, tmp_path: Path) -> None:
    imds = Imds()
    got = fetch(_nothing(tmp_path, ec2_endpoint=serve(imds.handler())), "ec2")
    assert got is not None and "IMDSv2" in got.source
    assert got.userdata == USERDATA
    md = got.metadata
    assert (md.instance_id, md.private_ipv4, md.public_ipv4) == ("i-0123456789", "10.1.2.3", "203.0.113.7")
    assert md.public_keys == ["ssh-ed25519 AAAAlaptop laptop", "ssh-ed25519 AAAAci ci"]
    assert imds.requests[0] == ("PUT", "/latest/api/token", "21600")
    assert all(tok == "tok-123" for method, _, tok in imds.requests[1:] if method == "GET")


def test_ec2_falls_back_to_imdsv1(serve, tmp_path: Path) -> None:
    imds = Imds(v2=False)
    got = fetch(_nothing(tmp_path, ec2_endpoint=serve(imds.handler())), "ec2")
    assert got is not None and "IMDSv1" in got.source and got.metadata.private_ipv4 == "10.1.2.3"


def test_ec2_retries_5xx(serve, tmp_path: Path) -> None:
    imds = Imds(fail_first=2)
    got = fetch(_nothing(tmp_path, ec2_endpoint=serve(imds.handler()), attempts=4), "ec2")
    assert got is not None and got.userdata == USERDATA
    assert sum(1 for m, p, _ in imds.requests if p == "/latest/meta-data/instance-id") == 3


def test_ec2_apply_end_to_end_substitutes_metadata(serve, tmp_path: Path, root: Path) -> None:
    url = serve(Imds().handler())
    res = runner.invoke(app, ["apply", "--datasource", "ec2", "--ec2-endpoint", url, "--root", str(root),
                              "--attempts", "2"])
    assert res.exit_code == 0, res.output
    assert (root / "etc/hostname").read_text() == "from-10.1.2.3\n"
    assert (root / "etc/ip").read_text() == "10.1.2.3"
    assert "ssh-ed25519 AAAAci ci" in (root / "home/core/.ssh/authorized_keys").read_text()
    assert "COREOS_PUBLIC_IPV4=203.0.113.7" in (root / "etc/environment").read_text()
    again = runner.invoke(app, ["apply", "--datasource", "ec2", "--ec2-endpoint", url, "--root", str(root)])
    assert "nothing to change" in again.stdout


def test_url_from_kernel_cmdline(serve, tmp_path: Path) -> None:
    class H(BaseHTTPRequestHandler):
        hits = 0

        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            H.hits += 1
            body = b"#cloud-config\nhostname: pxe-host\n" if self.path == "/cc?mac=52-54-00-aa-bb-cc" else b""
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    url = serve(H)
    cmd = tmp_path / "cmdline"
    cmd.write_text(f"console=ttyS0 cloud-config-url=http://wrong/ cloud_config_url={url}/cc?mac=52-54-00-aa-bb-cc "
                   "quiet\n")
    got = fetch(_nothing(tmp_path))
    assert got is not None and got.source.startswith("url (") and got.userdata.endswith(b"hostname: pxe-host\n")
    cmd.write_text(f"cloud-config-url={url}/missing\n")
    missing = fetch(_nothing(tmp_path), "url")
    assert missing is not None and missing.userdata == b""  # 4xx: no user-data, no retries
    assert H.hits == 2


def test_url_retries_then_gives_a_clean_error(tmp_path: Path) -> None:
    (tmp_path / "cmdline").write_text("cloud-config-url=http://127.0.0.1:9/cc\n")
    with pytest.raises(DatasourceError, match="no answer after 3 attempts"):
        fetch(_nothing(tmp_path, attempts=3), "url")


def test_cmdline_parsing() -> None:
    assert cmdline_url("a cloud-config-url=http://x/1 b cloud_config_url=http://x/2") == "http://x/2"
    assert cmdline_url("root=/dev/sda cloud-config-urlx=1") is None


@pytest.mark.parametrize("key", ["ignition.config.url", "flatcar.config.url", "coreos.config.url"])
def test_cmdline_ignition_url(key: str) -> None:
    assert cmdline_url(f"console=ttyS0 {key}=http://x/a.ign quiet") == "http://x/a.ign"
    assert cmdline_url(f"{key}=http://x/1 {key}=http://x/2") == "http://x/2"  # the last one wins
    # an Ignition URL wins over cloud-config-url= in either order (cloud-config is not applied on top of Ignition)
    assert cmdline_url(f"cloud-config-url=http://x/cc {key}=http://x/i") == "http://x/i"
    assert cmdline_url(f"{key}=http://x/i cloud-config-url=http://x/cc") == "http://x/i"
    assert cmdline_url(f"{key}= cloud-config-url=http://x/cc") == "http://x/cc"  # empty: as if absent
    assert cmdline_url(f"{key.replace('.', '_')}=http://x/i {key}x=http://x/j {key.upper()}=http://x/k") is None


def test_configdrive_directory(tmp_path: Path, root: Path) -> None:
    drive = tmp_path / "config-2"
    latest = drive / "openstack/latest"
    latest.mkdir(parents=True)
    (latest / "user_data").write_bytes(b"#cloud-config\nwrite_files:\n  - path: /etc/from-drive\n    content: yes\n")
    (latest / "meta_data.json").write_text(json.dumps({
        "uuid": "83679162-1378-4288-a2d4-70e13ec132aa", "hostname": "drive-host",
        "public_keys": {"mykey": "ssh-ed25519 AAAAdrive drive"}}))
    got = fetch(_nothing(tmp_path, configdrive_dirs=(str(tmp_path / "absent"), str(drive))))
    assert got is not None and got.source == f"configdrive ({drive})"
    assert got.metadata.hostname == "drive-host" and got.metadata.public_keys == ["ssh-ed25519 AAAAdrive drive"]
    res = runner.invoke(app, ["apply", "--datasource", "configdrive", "--configdrive", str(drive),
                              "--root", str(root)])
    assert res.exit_code == 0, res.output
    assert (root / "etc/hostname").read_text() == "drive-host\n"  # from metadata: user-data has none
    assert (root / "etc/from-drive").read_text() == "yes"


def test_nocloud_directory(tmp_path: Path) -> None:
    seed = tmp_path / "cidata"
    seed.mkdir()
    (seed / "user-data").write_bytes(b"#cloud-config\nhostname: nc\n")
    (seed / "meta-data").write_text("instance-id: iid-local01\nlocal-hostname: nocloud-host\n"
                                    "public-keys:\n  - ssh-ed25519 AAAAnc nc\n")
    got = fetch(_nothing(tmp_path, nocloud_dirs=(str(seed),)))
    assert got is not None and got.source == f"nocloud ({seed})"
    assert (got.metadata.instance_id, got.metadata.hostname) == ("iid-local01", "nocloud-host")
    assert got.metadata.public_keys == ["ssh-ed25519 AAAAnc nc"]


def test_order_and_nothing_found(tmp_path: Path) -> None:
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "user-data").write_bytes(b"#cloud-config\n")
    drive = tmp_path / "drive/openstack/latest"
    drive.mkdir(parents=True)
    (drive / "user_data").write_bytes(b"#cloud-config\nhostname: d\n")
    got = fetch(_nothing(tmp_path, nocloud_dirs=(str(seed),), configdrive_dirs=(str(tmp_path / "drive"),)))
    assert got is not None and got.source.startswith("configdrive")  # config-drive is probed before NoCloud
    assert fetch(_nothing(tmp_path)) is None  # EC2 endpoint is a closed port: probed, not found
    res = runner.invoke(app, ["apply", "--cmdline", str(tmp_path / "cmdline"), "--ec2-endpoint", "http://127.0.0.1:9",
                              "--configdrive", str(tmp_path / "none"), "--nocloud", str(tmp_path / "none"),
                              "--attempts", "1", "--by-label", str(tmp_path / "none"), "--root", str(tmp_path)])
    assert res.exit_code == 0 and "no user-data found" in res.stderr


def test_explicit_source_without_data_is_a_clean_error(tmp_path: Path) -> None:
    res = runner.invoke(app, ["apply", "--datasource", "nocloud", "--nocloud", str(tmp_path / "x"),
                              "--by-label", str(tmp_path / "x"), "--root", str(tmp_path)])
    assert res.exit_code == 2 and res.stderr.strip() == "error: datasource nocloud has no user-data on this host"
    res = runner.invoke(app, ["apply", "--datasource", "azure", "--root", str(tmp_path)])
    assert res.exit_code == 2 and "unknown datasource 'azure'" in res.stderr


def _fat_volume(tmp_path: Path, label: str, files: dict[str, bytes]) -> Path:
    """A real FAT filesystem image with a volume label, as a hypervisor attaches for config-2 / CIDATA."""
    from obelisk.tools import run

    img = tmp_path / f"{label}.img"
    run(["mkfs.vfat", "-C", "-n", label, img, "1440"])
    for name, data in files.items():
        src = tmp_path / "src"
        src.write_bytes(data)
        parts = name.split("/")
        for i in range(1, len(parts)):
            run(["mmd", "-D", "s", "-i", img, "::/" + "/".join(parts[:i])], check=False,
                env={"MTOOLS_SKIP_CHECK": "1"})
        run(["mcopy", "-i", img, src, f"::/{name}"], env={"MTOOLS_SKIP_CHECK": "1"})
    return img


def test_labelled_volumes(tmp_path: Path) -> None:
    by_label = tmp_path / "by-label"
    by_label.mkdir()
    drive = _fat_volume(tmp_path, "config-2", {
        "openstack/latest/user_data": b"#cloud-config\nhostname: fat-drive\n",
        "openstack/latest/meta_data.json": json.dumps({"hostname": "md-host", "uuid": "u-1"}).encode()})
    (by_label / "config-2").symlink_to(drive)
    got = fetch(_nothing(tmp_path, by_label=by_label), "configdrive")
    assert got is not None and got.userdata == b"#cloud-config\nhostname: fat-drive\n"
    assert got.metadata.instance_id == "u-1" and str(by_label / "config-2") in got.source
    seed = _fat_volume(tmp_path, "CIDATA", {"user-data": b"#cloud-config\nhostname: fat-seed\n",
                                             "meta-data": b"instance-id: iid-9\n"})
    (by_label / "CIDATA").symlink_to(seed)
    got = fetch(_nothing(tmp_path, by_label=by_label), "nocloud")
    assert got is not None and got.userdata.endswith(b"fat-seed\n") and got.metadata.instance_id == "iid-9"
