"""Butane and Ignition templates per host through the real `obelisk provision serve`: `/ignition` serves
the Ignition JSON (Butane translated, as matchbox's /ignition), `/cloud` the rendered config, both
validated by the Ignition engine; a host applies what `/ignition` serves, also through the kernel
command line's ignition.config.url=."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest
from test_provision_read import clean_log, one_line_error, put, raw
from testlib import OBELISK
from typer.testing import CliRunner

from cloudconfig import ignition
from cloudconfig.cli import app as cloudconfig_app
from obelisk.cli import build_app

pytestmark = pytest.mark.timeout(120)
MAC = "52:54:00:0f:0f:01"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK core@flatcar"

BUTANE = """variant: flatcar
version: 1.1.0
# Rendered per host: `| yaml` keeps every value one quoted scalar.
passwd:
  users:
    - name: core
      ssh_authorized_keys: [{{ ssh_key | yaml }}]
storage:
  files:
    - path: /etc/obelisk/role
      mode: 0644
      contents:
        inline: {{ ("role=" ~ role ~ "\\nmac=" ~ request.query.mac ~ "\\nfrom=" ~ server_url ~ "\\n") | yaml }}
systemd:
  units:
    - name: hello.service
      enabled: true
      contents: |
        [Service]
        ExecStart=/bin/echo {{ role }}
        [Install]
        WantedBy=multi-user.target
"""

IGNITION = """{"ignition": {"version": "3.3.0"},
 "storage": {"files": [{"path": "/etc/obelisk/role", "mode": 420,
   "contents": {"source": "data:,{{ role | urlencode }}"}}]}}
"""


def _data(data: Path) -> Path:
    put(data, "cloud/flatcar.bu", BUTANE)
    put(data, "cloud/plain.ign", IGNITION)
    put(data, "cloud/disks.bu", "variant: fcos\nversion: 1.5.0\nstorage:\n  disks:\n    - device: /dev/vda\n")
    put(data, "cloud/local.bu", "variant: flatcar\nversion: 1.1.0\nstorage:\n  files:\n    - path: /etc/x\n"
                                "      contents:\n        local: x.txt\n")
    put(data, "cloud/raw.bu", "variant: flatcar\nversion: 1.1.0\nstorage:\n  files:\n    - path: /etc/x\n"
                              "      mode: {{ role }}\n")
    for ident, template in (("flatcar", "flatcar.bu"), ("plain", "plain.ign"), ("disks", "disks.bu"),
                            ("local", "local.bu"), ("raw", "raw.bu")):
        put(data, f"profiles/{ident}.json", {"release": "tiny", "cloud_id": template,
                                              "boot": {"args": ["ignition.config.url={{ server_url }}/ignition?"
                                                                "mac=${mac:hexhyp}"]}})
        put(data, f"groups/{ident}.json", {"profile": ident, "selector": {"os": ident},
                                           "metadata": {"role": "web server", "ssh_key": KEY}})
    return data


def test_butane_template_served_as_ignition_json(data: Path, serve, tmp_path: Path) -> None:  # noqa: ANN001
    s = serve(_data(data))
    r = raw(s, f"/ignition?os=flatcar&mac={MAC}")
    assert r.status == 200, r.text
    assert r.headers["content-type"] == "application/json"
    served = json.loads(r.body)
    assert served["ignition"]["version"] == "3.4.0"
    assert served["passwd"]["users"] == [{"name": "core", "sshAuthorizedKeys": [KEY]}]
    # /cloud serves the rendered Butane; /ignition is exactly what translating it gives
    cloud = raw(s, f"/cloud?os=flatcar&mac={MAC}")
    assert cloud.status == 200 and cloud.text.startswith("variant: flatcar\n")
    data_out, rep = ignition.translate(cloud.body)
    assert rep.ok and data_out is not None and json.loads(data_out) == served
    # what a host applies from it: the file, the user's key, the unit enabled
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for f, text in (("passwd", "root:x:0:0:root:/root:/bin/bash\n"), ("group", "root:x:0:\nusers:x:100:\n"),
                    ("shadow", "root:*:19000:0:99999:7:::\n")):
        (root / "etc" / f).write_text(text)
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(f"console=ttyS0 ignition.config.url={s.url}/ignition?os=flatcar&mac={quote(MAC)}\n")
    res = CliRunner().invoke(cloudconfig_app, ["apply", "--ignition-only", "--root", str(root), "--datasource", "url",
                                               "--cmdline", str(cmdline), "--attempts", "1"])
    assert res.exit_code == 0, res.output
    assert (root / "etc/obelisk/role").read_text() == f"role=web server\nmac={MAC}\nfrom={s.url}\n"
    assert (root / "home/core/.ssh/authorized_keys").read_text() == KEY + "\n"
    assert (root / "etc/systemd/system/multi-user.target.wants/hello.service").is_symlink()
    assert ignition.provisioned_by_ignition(root)
    clean_log(s)


def test_ignition_template_and_what_is_refused(data: Path, serve) -> None:  # noqa: ANN001
    s = serve(_data(data))
    r = raw(s, "/ignition?os=plain")
    assert r.status == 200, r.text
    assert json.loads(r.body)["storage"]["files"][0]["contents"]["source"] == "data:,web%20server"
    assert raw(s, "/cloud?os=plain").text.startswith('{"ignition": {"version": "3.3.0"}')
    cases = [
        # a cloud-config profile has no Ignition config: 404, as a profile without cloud_id
        (f"/ignition?mac={MAC}", 404, ["cloud/node.yaml for group 'default' renders a cloud-config or script, not "
                                       "an Ignition or Butane config: hosts read it from /cloud"]),
        ("/ignition?os=disks", 500, ["rendered an invalid Butane config (line 5 column 5: error: ", "/storage/disks",
                                     "obelisk does not partition disks"]),
        ("/cloud?os=disks", 500, ["/storage/disks"]),
        ("/ignition?os=local", 500, ["rendered an invalid Butane config (line ", "/storage/files/0/contents/local"]),
        # without `| yaml` a value breaks the config: refused whole, nothing of it served
        ("/ignition?os=raw", 500, ["rendered an invalid Butane config (line ", "/storage/files/0/mode"]),
        ("/ignition?os=flatcar", 400, ["needs the request label 'mac'"]),
    ]
    for target, status, needles in cases:
        got = raw(s, target)
        assert got.status == status, (target, got.status, got.text)
        line = one_line_error(got)
        for n in needles:
            assert n in line, (target, line)
        assert "variant" not in line and "ignition\"" not in line
    head = raw(s, f"/ignition?os=flatcar&mac={MAC}", method="HEAD")
    assert head.status == 200 and head.body == b"" and head.headers["content-type"] == "application/json"
    clean_log(s)


def test_provision_check_takes_butane_templates(data: Path) -> None:
    _data(data)
    for bad in ("disks", "local", "raw"):
        (data / f"groups/{bad}.json").unlink()
        (data / f"profiles/{bad}.json").unlink()
        (data / "cloud" / {"disks": "disks.bu", "local": "local.bu", "raw": "raw.bu"}[bad]).unlink()
    res = CliRunner().invoke(build_app(["provision"]), ["provision", "check", "--data", str(data)])
    assert res.exit_code == 0, res.output
    put(data, "cloud/disks.bu", "variant: fcos\nversion: 1.5.0\nstorage:\n  disks:\n    - device: /dev/vda\n")
    put(data, "profiles/disks.json", {"release": "tiny", "cloud_id": "disks.bu"})
    put(data, "groups/disks.json", {"profile": "disks", "selector": {"os": "disks"}, "metadata": {}})
    bad = subprocess.run([OBELISK, "provision", "check", "--data", str(data)], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode != 0 and "/storage/disks" in bad.stdout + bad.stderr


def test_profile_names_an_ignition_template_of_its_own(data: Path, serve, tmp_path: Path) -> None:  # noqa: ANN001
    """`ignition_id`: one profile gives a host a cloud-config at /cloud and an Ignition config at /ignition;
    a cloud-config in ignition/ is broken data (500), a missing template is refused by check and the API."""
    _data(data)
    put(data, "cloud/both.yaml", "#cloud-config\nhostname: {{ role | replace(' ', '-') }}\n")
    put(data, "ignition/both.bu", BUTANE)
    put(data, "ignition/wrong.yaml", "#cloud-config\nhostname: x\n")
    for ident, extra in (("both", {"cloud_id": "both.yaml", "ignition_id": "both.bu"}),
                         ("wrong", {"ignition_id": "wrong.yaml"}), ("generic", {"generic_id": "none"})):
        put(data, f"profiles/{ident}.json", {"release": "tiny", **extra})
        put(data, f"groups/{ident}.json", {"profile": ident, "selector": {"os": ident},
                                           "metadata": {"role": "web server", "ssh_key": KEY}})
    put(data, "generic/none", "x={{ role }}\n")
    s = serve(data)
    cloud = raw(s, f"/cloud?os=both&mac={MAC}")
    assert cloud.status == 200 and cloud.text == "#cloud-config\nhostname: web-server\n", cloud.text
    ign = raw(s, f"/ignition?os=both&mac={MAC}")
    assert ign.status == 200 and ign.headers["content-type"] == "application/json", ign.text
    assert json.loads(ign.body)["passwd"]["users"] == [{"name": "core", "sshAuthorizedKeys": [KEY]}]
    # without ignition_id the cloud template stands in (it is Butane for os=flatcar), as before
    assert raw(s, f"/ignition?os=flatcar&mac={MAC}").status == 200
    for target, status, needle in (
            ("/ignition?os=wrong", 500, "ignition/wrong.yaml for group 'wrong' renders a cloud-config or script; an "
                                        "ignition template must be an Ignition JSON or Butane YAML config"),
            ("/ignition?os=generic", 404, "profile 'generic' (group 'generic') has no ignition_id or cloud_id"),
            ("/cloud?os=wrong", 404, "has no cloud_id")):
        got = raw(s, target)
        assert got.status == status, (target, got.status, got.text)
        assert needle in one_line_error(got), (target, got.text)
    clean_log(s)
    # obelisk provision check renders ignition templates too, and names a missing one
    res = CliRunner().invoke(build_app(["provision"]), ["provision", "check", "--data", str(data)])
    assert res.exit_code != 0 and "ignition/wrong.yaml for group 'wrong' renders a cloud-config" in res.output, \
        res.output
    (data / "groups/wrong.json").unlink()
    put(data, "profiles/wrong.json", {"release": "tiny", "ignition_id": "gone.bu"})
    res = CliRunner().invoke(build_app(["provision"]), ["provision", "check", "--data", str(data)])
    assert res.exit_code != 0 and "ignition_id 'gone.bu': no ignition/gone.bu" in res.output, res.output


def test_write_api_takes_ignition_templates(tmp_path: Path) -> None:
    import requests
    from prov_helpers import AUTH, serving_rw

    with serving_rw(tmp_path) as (s, data):
        def api(method: str, path: str, **kw: object) -> requests.Response:
            return requests.request(method, f"{s.url}/api/v1{path}", headers={**AUTH, "Connection": "close"},
                                    timeout=30, **kw)
        r = api("PUT", "/profiles/ign", json={"release": "tiny", "ignition_id": "host.bu"})
        assert r.status_code == 409 and "ignition template 'host.bu', which does not exist" in r.text, r.text
        assert api("PUT", "/templates/ignition/host.bu", data=BUTANE.encode()).status_code in (200, 201)
        assert api("PUT", "/profiles/ign", json={"release": "tiny", "ignition_id": "host.bu"}).status_code in (200, 201)
        assert api("GET", "/templates/ignition").json() == {"templates": ["host.bu"]}
        r = api("DELETE", "/templates/ignition/host.bu")
        assert r.status_code == 409 and "used by profile(s) ign" in r.text, r.text
        assert (data / "ignition/host.bu").read_text() == BUTANE
