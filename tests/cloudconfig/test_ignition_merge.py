"""Ignition's merge rules, with the cases of coreos/ignition config/merge/merge_test.go in dict form."""

from __future__ import annotations

import copy

import pytest

from cloudconfig.ignition.merge import merge

pytestmark = pytest.mark.timeout(30)


def test_empty_configs_merge_to_empty() -> None:
    assert merge({}, {}) == {}


def test_version_is_the_childs() -> None:
    assert merge({"ignition": {"version": "1234"}}, {"ignition": {"version": "haha"}}) == \
        {"ignition": {"version": "haha"}}


def test_lists_merge_by_key_and_files_dirs_links_share_paths() -> None:
    """merge_test.go case 3: disks by device (partitions by number), file appends concatenated,
    a parent file replaced by a child directory of the same path, SSH keys by value."""
    parent = {"storage": {
        "disks": [{"device": "foo", "wipeTable": True, "partitions": [{"number": 1, "label": "label", "startMiB": 4}]},
                  {"device": "bar", "wipeTable": True}],
        "files": [{"path": "/foo", "append": [{"source": "source1"}]},
                  {"path": "/bar", "contents": {"compression": "gzip"}}]},
        "passwd": {"users": [{"name": "bovik", "sshAuthorizedKeys": ["one", "two"]}]}}
    child = {"storage": {
        "disks": [{"device": "foo", "wipeTable": False,
                   "partitions": [{"number": 1, "label": "labelchanged"}, {"number": 2, "label": "label2"}]},
                  {"device": "bar"}, {"device": "baz", "wipeTable": True}],
        "files": [{"path": "/foo", "append": [{"source": "source1"}, {"source": "source2"}]}],
        "directories": [{"path": "/bar"}],
        "links": [{"path": "/baz"}]},
        "passwd": {"users": [{"name": "bovik", "sshAuthorizedKeys": ["three", "two"]}]}}
    before = copy.deepcopy((parent, child))
    assert merge(parent, child) == {"storage": {
        "directories": [{"path": "/bar"}],
        "disks": [{"device": "foo", "wipeTable": False,
                   "partitions": [{"number": 1, "label": "labelchanged", "startMiB": 4},
                                  {"number": 2, "label": "label2"}]},
                  {"device": "bar", "wipeTable": True}, {"device": "baz", "wipeTable": True}],
        "files": [{"path": "/foo", "append": [{"source": "source1"}, {"source": "source1"}, {"source": "source2"}]}],
        "links": [{"path": "/baz"}]},
        "passwd": {"users": [{"name": "bovik", "sshAuthorizedKeys": ["one", "two", "three"]}]}}
    assert (parent, child) == before  # inputs untouched


@pytest.mark.parametrize("where", ["merge", "replace"])
def test_http_headers_merge_by_name_and_a_header_without_value_removes(where: str) -> None:
    def ref(headers: list[dict[str, str]]) -> dict:
        r = {"source": "http://example.com/myconf.ign", "httpHeaders": headers}
        return {"ignition": {"config": {where: [r] if where == "merge" else r}}}
    out = merge(ref([{"name": "old-header", "value": "old-value"}, {"name": "same-header", "value": "old-value"},
                     {"name": "to-remove-header", "value": "some-value"}]),
                ref([{"name": "to-remove-header"}, {"name": "new-header", "value": "new-value"},
                     {"name": "same-header", "value": "new-value"}]))
    assert out == ref([{"name": "old-header", "value": "old-value"}, {"name": "same-header", "value": "new-value"},
                       {"name": "new-header", "value": "new-value"}])


def test_pointer_fields_keep_the_parents_value_unless_the_child_sets_them() -> None:
    parent = {"storage": {"files": [{"path": "/a", "mode": 420, "overwrite": True, "user": {"name": "core"},
                                     "contents": {"source": "data:,a", "verification": {"hash": "sha512-x"}}}]}}
    child = {"storage": {"files": [{"path": "/a", "mode": 384, "contents": {"source": "data:,b"}}]}}
    assert merge(parent, child) == {"storage": {"files": [{
        "path": "/a", "mode": 384, "overwrite": True, "user": {"name": "core"},
        "contents": {"source": "data:,b", "verification": {"hash": "sha512-x"}}}]}}


def test_false_is_a_value_not_unset() -> None:
    out = merge({"systemd": {"units": [{"name": "a.service", "enabled": True, "mask": True}]}},
                {"systemd": {"units": [{"name": "a.service", "enabled": False}]}})
    assert out == {"systemd": {"units": [{"name": "a.service", "enabled": False, "mask": True}]}}


def test_units_and_dropins_merge_by_name_new_ones_follow() -> None:
    parent = {"systemd": {"units": [{"name": "a.service", "contents": "A", "dropins": [{"name": "1.conf",
                                                                                          "contents": "x"}]},
                                    {"name": "b.service", "mask": True}]}}
    child = {"systemd": {"units": [{"name": "c.service", "enabled": True},
                                   {"name": "a.service", "dropins": [{"name": "2.conf", "contents": "y"},
                                                                     {"name": "1.conf", "contents": "z"}]}]}}
    assert merge(parent, child) == {"systemd": {"units": [
        {"name": "a.service", "contents": "A", "dropins": [{"name": "1.conf", "contents": "z"},
                                                           {"name": "2.conf", "contents": "y"}]},
        {"name": "b.service", "mask": True}, {"name": "c.service", "enabled": True}]}}


def test_a_file_that_becomes_a_link_in_the_child_is_dropped() -> None:
    parent = {"storage": {"files": [{"path": "/x", "contents": {"source": "data:,1"}}, {"path": "/keep"}],
                          "links": [{"path": "/y", "target": "/t"}]}}
    child = {"storage": {"links": [{"path": "/x", "target": "/z"}], "files": [{"path": "/y"}]}}
    assert merge(parent, child) == {"storage": {"files": [{"path": "/keep"}, {"path": "/y"}],
                                                "links": [{"path": "/x", "target": "/z"}]}}


def test_kernel_arguments_share_one_key_space() -> None:
    out = merge({"kernelArguments": {"shouldExist": ["a", "b"], "shouldNotExist": ["c"]}},
                {"kernelArguments": {"shouldNotExist": ["a"], "shouldExist": ["c", "d"]}})
    assert out == {"kernelArguments": {"shouldExist": ["b", "c", "d"], "shouldNotExist": ["a"]}}


def test_users_groups_and_merge_lists() -> None:
    parent = {"passwd": {"users": [{"name": "a", "uid": 1, "groups": ["x"]}], "groups": [{"name": "g", "gid": 5}]},
              "ignition": {"config": {"merge": [{"source": "http://h/1"}]}}}
    child = {"passwd": {"users": [{"name": "a", "groups": ["y"], "shell": "/bin/sh"}, {"name": "b"}],
                        "groups": [{"name": "g", "system": True}]},
             "ignition": {"config": {"merge": [{"source": "http://h/2"}]}}}
    assert merge(parent, child) == {
        "ignition": {"config": {"merge": [{"source": "http://h/1"}, {"source": "http://h/2"}]}},
        "passwd": {"groups": [{"name": "g", "gid": 5, "system": True}],
                   "users": [{"name": "a", "uid": 1, "groups": ["x", "y"], "shell": "/bin/sh"}, {"name": "b"}]}}


def test_an_empty_child_object_keeps_the_parents() -> None:
    parent = {"ignition": {"timeouts": {"httpTotal": 5}, "proxy": {"httpProxy": "http://p"}}}
    assert merge(parent, {"ignition": {"timeouts": {}}}) == parent
    assert merge({}, parent) == parent
