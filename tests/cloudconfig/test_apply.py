"""`obelisk cloudconfig apply` into temporary roots: files, modes, owners, units, links, settings files."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cloudconfig_helpers import make_root, tree_digest
from typer.testing import CliRunner

from cloudconfig.apply import ConfigApplyError, InvalidConfig, apply_userdata
from cloudconfig.cli import app
from obelisk.lock_conf import LockConfig
from obelisk.update_conf import UpdateConf

CORPUS = Path(__file__).parent / "corpus"
runner = CliRunner()
ADDR = {"private_ipv4": "10.0.0.5", "public_ipv4": "203.0.113.5", "private_ipv6": "fd00::5",
        "public_ipv6": "2001:db8::5"}

FULL = textwrap.dedent("""\
    #cloud-config
    hostname: node-1
    manage_etc_hosts: localhost
    ssh_authorized_keys:
      - ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBx core@example
    users:
      - name: alice
        gecos: Alice
        passwd: $6$salt$hash
        groups: [sudo, docker]
        ssh-authorized-keys: ["ssh-ed25519 AAAAalice alice@x"]
      - name: svc
        system: true
        no-create-home: true
    write_files:
      - path: /etc/motd
        content: hello $private_ipv4
        owner: alice:docker
        permissions: "0640"
      - path: /etc/ssl/etcd/key.pem
        content: KEY
      - path: /var/lib/app/blob
        encoding: gzip+base64
        content: H4sIAAAAAAAAA8tIzcnJVyjPL8pJAQCFEUoNCwAAAA==
    coreos:
      etcd2:
        name: node-1
        initial-cluster: node-1=http://$private_ipv4:2380
        initial-advertise-peer-urls: http://$private_ipv4:2380
        listen-peer-urls: http://$private_ipv4:2380
        key-file: /etc/ssl/etcd/key.pem
        client-cert-auth: yes
      update:
        reboot-strategy: etcd-lock
        group: beta
      locksmith:
        endpoint: http://127.0.0.1:2379
        group: web
        window-start: Thu 04:00
        window-length: 1h
        etcd-keyfile: /etc/ssl/etcd/key.pem
        etcd-certfile: /etc/ssl/etcd/cert.pem
      units:
        - name: etcd2.service
          command: start
          enable: true
        - name: hello.service
          enable: true
          content: |
            [Service]
            ExecStart=/bin/echo hi
            [Install]
            WantedBy=multi-user.target
          drop-ins:
            - name: 10-env.conf
              content: "[Service]\\nEnvironment=A=1\\n"
        - name: docker.service
          mask: true
        - name: 10-eth.network
          runtime: true
          content: "[Match]\\nName=eth0\\n"
    """).encode()


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def test_full_config(root: Path) -> None:
    res = apply_userdata(FULL, root, addresses=ADDR)
    assert res.changed
    assert (root / "etc/hostname").read_text() == "node-1\n"
    assert "127.0.0.1 localhost node-1" in (root / "etc/hosts").read_text()
    # users, groups, shadow
    passwd = {ln.split(":")[0]: ln.split(":") for ln in (root / "etc/passwd").read_text().splitlines()}
    assert passwd["alice"][2:7] == ["1000", "1000", "Alice", "/home/alice", "/bin/bash"]
    assert int(passwd["svc"][2]) < 1000  # system user
    assert "core" in passwd
    groups = {ln.split(":")[0]: ln.split(":") for ln in (root / "etc/group").read_text().splitlines()}
    assert groups["sudo"][3] == "alice" and groups["docker"][3] == "alice" and groups["alice"][2] == "1000"
    shadow = {ln.split(":")[0]: ln.split(":") for ln in (root / "etc/shadow").read_text().splitlines()}
    assert shadow["alice"][1] == "$6$salt$hash" and shadow["svc"][1] == "*"
    assert _mode(root / "etc/shadow") == 0o640 and (root / "etc/shadow").stat().st_gid == 42
    home = root / "home/alice"
    assert home.is_dir() and _mode(home) == 0o700 and home.stat().st_uid == 1000
    assert not (root / "home/svc").exists()
    keys = root / "home/alice/.ssh/authorized_keys"
    assert keys.read_text() == "ssh-ed25519 AAAAalice alice@x\n" and _mode(keys) == 0o600
    assert keys.stat().st_uid == 1000
    assert "core@example" in (root / "home/core/.ssh/authorized_keys").read_text()
    # write_files: substitution, owner, mode, encodings, TLS key defaults
    motd = root / "etc/motd"
    assert motd.read_text() == "hello 10.0.0.5" and _mode(motd) == 0o640
    assert (motd.stat().st_uid, motd.stat().st_gid) == (1000, 997)
    key = root / "etc/ssl/etcd/key.pem"
    assert _mode(key) == 0o600 and key.stat().st_uid == 998  # private key, owned by etcd (it runs as User=etcd)
    assert (root / "var/lib/app/blob").read_bytes() == b"hello world"
    assert _mode(root / "var/lib/app") == 0o755
    # etcd: env file loaded by a drop-in of etcd.service
    env = (root / "etc/obelisk/etcd.env").read_text()
    assert "ETCD_INITIAL_CLUSTER=node-1=http://10.0.0.5:2380\n" in env
    assert "ETCD_CLIENT_CERT_AUTH=true\n" in env and "ETCD_NAME=node-1\n" in env
    dropin = (root / "etc/systemd/system/etcd.service.d/20-obelisk-cloudconfig.conf").read_text()
    assert "EnvironmentFile=/etc/obelisk/etcd.env" in dropin
    # update.conf and lock.conf parse with their owners' models
    upd = UpdateConf.parse((root / "etc/obelisk/update.conf").read_text())
    assert (upd.group, upd.reboot_strategy, upd.server) == ("beta", "etcd-lock",
                                                            "https://updates.example.com/v1/update/")
    lock = LockConfig.parse((root / "etc/obelisk/lock.conf").read_text())
    assert lock.endpoint == ["http://127.0.0.1:2379"] and lock.group == "web"
    assert (lock.window_start, lock.window_length) == ("Thu 04:00", "1h")
    assert lock.keyfile == "/etc/ssl/etcd/key.pem"
    # units
    sysd = root / "etc/systemd/system"
    assert os.readlink(sysd / "multi-user.target.wants/etcd.service") == "/usr/lib/systemd/system/etcd.service"
    assert os.readlink(sysd / "etcd2.service") == "/usr/lib/systemd/system/etcd.service"
    assert os.readlink(sysd / "multi-user.target.wants/hello.service") == "/etc/systemd/system/hello.service"
    assert (sysd / "hello.service.d/10-env.conf").read_text() == "[Service]\nEnvironment=A=1\n"
    assert os.readlink(sysd / "docker.service") == "/dev/null"
    assert (root / "run/systemd/network/10-eth.network").read_text() == "[Match]\nName=eth0\n"
    assert "COREOS_PRIVATE_IPV4=10.0.0.5" in (root / "etc/environment").read_text()
    assert any("systemctl start etcd.service" in n for n in res.notes)


def test_second_apply_changes_nothing(root: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "cc.yaml"
    cfg.write_bytes(FULL)
    env = {f"COREOS_{k.upper()}": v for k, v in ADDR.items()}
    first = runner.invoke(app, ["apply", str(cfg), "--root", str(root)], env=env)
    assert first.exit_code == 0, first.output
    assert "applied" in first.stdout
    digest = tree_digest(root)
    second = runner.invoke(app, ["apply", str(cfg), "--root", str(root)], env=env)
    assert second.exit_code == 0
    assert "nothing to change" in second.stdout and "wrote" not in second.stdout
    assert tree_digest(root) == digest


def test_unit_named_twice_then_masked_is_applied_once(root: Path) -> None:
    """Found by the fuzz test: the first entry planned an unmask, the second a mask; a second apply
    must see the mask already there and change nothing."""
    raw = b"#cloud-config\ncoreos:\n  units:\n  - name: a.service\n  - mask: true\n    name: a.service\n"
    assert apply_userdata(raw, root).changed
    assert os.readlink(root / "etc/systemd/system/a.service") == "/dev/null"
    assert not apply_userdata(raw, root).changed


@pytest.mark.parametrize("bad", [
    b"#cloud-config\nhostname: ok\nwrite_files:\n  - path: /etc/a\n    permissions: 0999\n",
    b"#cloud-config\nhostname: [unclosed\n",
    b"#cloud-configgg\nhostname: a\n",
    b"#cloud-config\nhostname: a\nusers:\n  - name: bob\n    groups: [nosuchgroup]\n",  # fails while planning
    b"#cloud-config\nwrite_files:\n  - path: /etc/a\n    owner: nobody:nogroup\n    content: x\n",
    b"#cloud-config\nwrite_files:\n  - path: /etc/passwd/x\n    content: x\n",  # parent is a file
    b"#cloud-config\nhostname: a\nwrite_files:\n  - path: /etc/b\n    content: $private_ipv4\n",  # no address
    b"#cloud-config\ncoreos:\n  units:\n    - name: missing.service\n      enable: true\n",
])
def test_bad_config_leaves_root_byte_identical(root: Path, bad: bytes) -> None:
    apply_userdata(b"#cloud-config\nhostname: before\n", root)
    digest = tree_digest(root)
    with pytest.raises(ConfigApplyError):
        apply_userdata(bad, root)
    assert tree_digest(root) == digest


def test_invalid_config_cli_prints_the_report(root: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("#cloud-config\ncoreos:\n  update:\n    reboot-strategy: sometimes\n")
    digest = tree_digest(root)
    res = runner.invoke(app, ["apply", str(cfg), "--root", str(root)])
    assert res.exit_code == 1
    assert res.stderr.splitlines() == [
        "line 4: error: invalid value 'sometimes': use one of off, reboot, etcd-lock, fleetlock, best-effort",
        f"error: {cfg} has 1 error(s); nothing was changed"]
    assert tree_digest(root) == digest


def test_link_out_of_the_root_is_refused(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "etc/evil").symlink_to(outside)
    with pytest.raises(ConfigApplyError, match="not a directory inside the target root"):
        apply_userdata(b"#cloud-config\nwrite_files:\n  - path: /etc/evil/x\n    content: x\n", root)
    assert list(outside.iterdir()) == []


def test_existing_user_only_gets_password_and_keys(root: Path) -> None:
    apply_userdata(b"#cloud-config\nusers:\n  - name: bob\n    gecos: Bob\n", root)
    before = (root / "etc/passwd").read_text()
    apply_userdata(b"#cloud-config\nusers:\n  - name: bob\n    gecos: Robert\n    shell: /bin/zsh\n"
                   b"    passwd: $6$x$y\n    ssh-authorized-keys: [ssh-ed25519 AAAAbob]\n", root)
    assert (root / "etc/passwd").read_text() == before  # gecos and shell untouched, as coreos-cloudinit did
    assert "bob:$6$x$y:" in (root / "etc/shadow").read_text()
    assert (root / "home/bob/.ssh/authorized_keys").read_text() == "ssh-ed25519 AAAAbob\n"


def test_keys_already_there_are_kept(root: Path) -> None:
    apply_userdata(b"#cloud-config\nusers:\n  - name: bob\n", root)
    ssh = root / "home/bob/.ssh"
    ssh.mkdir()
    (ssh / "authorized_keys").write_text("ssh-rsa OLD old@host\n")
    apply_userdata(b"#cloud-config\nusers:\n  - name: bob\n    ssh-authorized-keys: [ssh-ed25519 NEW]\n", root)
    assert (ssh / "authorized_keys").read_text() == "ssh-ed25519 NEW\nssh-rsa OLD old@host\n"


def test_unmask_and_runtime_enable(root: Path) -> None:
    apply_userdata(b"#cloud-config\ncoreos:\n  units:\n    - name: sshd.service\n      mask: true\n", root)
    assert os.readlink(root / "etc/systemd/system/sshd.service") == "/dev/null"
    apply_userdata(b"#cloud-config\ncoreos:\n  units:\n    - name: sshd.service\n      enable: true\n"
                   b"      runtime: true\n", root)
    assert not os.path.lexists(root / "etc/systemd/system/sshd.service")
    link = root / "run/systemd/system/multi-user.target.wants/sshd.service"
    assert os.readlink(link) == "/usr/lib/systemd/system/sshd.service"


def test_script_is_saved_not_run(root: Path) -> None:
    res = apply_userdata(b"#!/bin/sh\ntouch /tmp/should-not-exist-obelisk\n", root)
    saved = root / "var/lib/obelisk/cloudconfig/scripts/user-data"
    assert saved.read_bytes().startswith(b"#!/bin/sh") and _mode(saved) == 0o744
    assert any("not run" in n for n in res.notes)
    assert not apply_userdata(b"#!/bin/sh\ntouch /tmp/should-not-exist-obelisk\n", root).changed


def test_empty_does_nothing(root: Path) -> None:
    digest = tree_digest(root)
    assert not apply_userdata(b"", root).changed
    assert tree_digest(root) == digest


def test_dry_run_changes_nothing(root: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "cc.yaml"
    cfg.write_text("#cloud-config\nhostname: dry\n")
    digest = tree_digest(root)
    res = runner.invoke(app, ["apply", str(cfg), "--root", str(root), "--dry-run"])
    assert res.exit_code == 0
    assert res.stdout.splitlines()[0] == "would write /etc/hostname (mode 0644, 4 bytes) [hostname]"
    assert "would apply 1 change(s)" in res.stdout
    assert tree_digest(root) == digest


VALID = [p for p in sorted(CORPUS.iterdir()) if p.suffix != ".expected"
         and "error:" not in p.with_suffix(".expected").read_text()]


@pytest.mark.parametrize("config", VALID, ids=lambda p: p.name)
def test_every_valid_corpus_config_applies_twice(config: Path, tmp_path: Path) -> None:
    root = make_root(tmp_path / "r")
    apply_userdata(config.read_bytes(), root, addresses=ADDR)
    digest = tree_digest(root)
    assert not apply_userdata(config.read_bytes(), root, addresses=ADDR).changed
    assert tree_digest(root) == digest


def test_killed_before_rename_leaves_old_file(root: Path) -> None:
    """SIGKILL the applying process at the moment it would rename the new file into place."""
    (root / "etc/motd").write_text("old\n")
    code = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        import cloudconfig.rootfs as rootfs
        real = os.replace
        def dying_replace(src, dst):
            if str(dst).endswith("/etc/motd"):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst)
        rootfs.os.replace = dying_replace
        from cloudconfig.apply import apply_userdata
        apply_userdata(b"#cloud-config\\nwrite_files:\\n  - path: /etc/motd\\n    content: new\\n", Path({str(root)!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == -9
    assert (root / "etc/motd").read_text() == "old\n"
    # the next boot's apply finishes the job (the stray temp file is harmless and ignored)
    apply_userdata(b"#cloud-config\nwrite_files:\n  - path: /etc/motd\n    content: new\n", root)
    assert (root / "etc/motd").read_text() == "new"


def test_invalid_config_error_type(root: Path) -> None:
    with pytest.raises(InvalidConfig) as info:
        apply_userdata(b"#cloud-config\nhostname: bad_name\n", root)
    assert info.value.report.errors[0].line == 2


def test_live_plan_uses_systemctl_and_useradd(root: Path) -> None:
    """What apply would do on the running system, shown with a dry run (nothing here touches this machine)."""
    res = apply_userdata(b"#cloud-config\nhostname: live-1\nusers:\n  - name: zed\n    groups: [sudo]\n"
                         b"coreos:\n  units:\n    - name: a.service\n      content: \"[Service]\\n\"\n"
                         b"      enable: true\n      command: restart\n    - name: b.service\n      mask: true\n",
                         root, live=True, dry_run=True)
    cmds = [" ".join(c) for c in res.commands]
    assert cmds == ["systemctl daemon-reload", "hostname live-1", "systemctl enable a.service",
                    "systemctl --no-block restart a.service"]
    assert "user zed is created with useradd" in res.notes
    assert not any(c.path == "/etc/passwd" for c in res.changes)  # useradd owns the live account files


def test_apply_json(root: Path, tmp_path: Path) -> None:
    import json

    cfg = tmp_path / "cc.yaml"
    cfg.write_text("#cloud-config\nhostname: j\nhostnmae: typo\n")
    res = runner.invoke(app, ["apply", str(cfg), "--root", str(root), "--json"])
    out = json.loads(res.stdout)
    assert out["changed"] is True and out["changes"] == ["wrote /etc/hostname (mode 0644, 2 bytes) [hostname]"]
    assert out["warnings"] == ['line 3: warning: unrecognized key "hostnmae" (did you mean "hostname"?)']
    again = json.loads(runner.invoke(app, ["apply", str(cfg), "--root", str(root), "--json"]).stdout)
    assert again["changed"] is False and again["changes"] == []


def test_address_that_is_not_an_address_is_refused(root: Path) -> None:
    digest = tree_digest(root)
    with pytest.raises(ConfigApplyError, match="private_ipv4 .* is not an IP address"):
        apply_userdata(b"#cloud-config\nhostname: a\n", root, addresses={"private_ipv4": "1.2.3.4\nusers: []"})
    assert tree_digest(root) == digest
