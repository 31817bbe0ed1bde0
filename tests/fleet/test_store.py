"""The fleet store on SQLite and on a real PostgreSQL: migrations, schema guard, groups, channels, bad values."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa
from alembic import command

from update_server.db import models
from update_server.db.store import FleetStoreError, NotFound, Store, alembic_config, head_revision, url_for
from update_server.policy import PolicyError

pytestmark = pytest.mark.timeout(120)


def test_migrations_from_empty_match_the_models(db_url: str) -> None:
    s = Store(url_for(db_url, None))
    try:
        assert s.revision() == head_revision() == "0002"
        insp = sa.inspect(s.engine)
        for table in models.metadata.sorted_tables:
            cols = {c["name"] for c in insp.get_columns(table.name)}
            assert cols == {c.name for c in table.columns}, table.name
            want_idx = {i.name for i in table.indexes}
            have_idx = {i["name"] for i in insp.get_indexes(table.name)}
            assert want_idx <= have_idx, (table.name, want_idx - have_idx)
    finally:
        s.close()
    again = Store(url_for(db_url, None))  # a second start finds the schema current and changes nothing
    assert again.revision() == "0002"
    again.close()


def test_upgrade_from_the_previous_revision_keeps_data(db_url: str) -> None:
    eng = sa.create_engine(url_for(db_url, None))
    with eng.begin() as c:
        command.upgrade(alembic_config(c), "0001")
        c.execute(sa.text("INSERT INTO groups (name, channel, policy, updated_at) VALUES ('stable', 'stable', "
                          "'{\"max_updates_per_period\": 3}', 5)"))
        c.execute(sa.text("INSERT INTO instances (machine_id, group_name, version, first_seen, last_checkin, "
                          "updated_at) VALUES ('m1', 'stable', '1.0.0', 1, 2, 3)"))
    eng.dispose()
    s = Store(url_for(db_url, None))
    try:
        assert s.revision() == "0002"
        g = s.group("stable")
        assert g.policy.max_updates_per_period == 3 and not g.halted and not g.paused
        assert s.instance("m1")["version"] == "1.0.0"
    finally:
        s.close()


def test_a_newer_schema_is_refused_with_one_line(db_url: str) -> None:
    Store(url_for(db_url, None)).close()
    eng = sa.create_engine(url_for(db_url, None))
    with eng.begin() as c:
        c.execute(sa.text("UPDATE alembic_version SET version_num = '0099'"))
    eng.dispose()
    with pytest.raises(FleetStoreError) as e:
        Store(url_for(db_url, None))
    msg = str(e.value)
    assert "'0099'" in msg and "newer than this server knows" in msg and "\n" not in msg
    eng = sa.create_engine(url_for(db_url, None))
    with eng.connect() as c:  # nothing was touched
        assert c.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == "0099"
    eng.dispose()


@pytest.mark.parametrize("url", ["mysql://x/y", "postgresql-ish://a", "file:///tmp/x"])
def test_unsupported_urls_are_refused(url: str) -> None:
    with pytest.raises(FleetStoreError, match="unsupported database URL"):
        url_for(url, None)


def test_sqlite_in_a_missing_folder_says_so(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(FleetStoreError, match="does not exist"):
        Store(url_for(None, tmp_path / "nope"))


def test_unreachable_postgresql_is_one_line(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(FleetStoreError) as e:
        Store(url_for(f"postgresql://nobody@/x?host={tmp_path}", None))
    assert "cannot open the database" in str(e.value) and "\n" not in str(e.value)


def test_groups_channels_and_switches(store: Store) -> None:
    store.set_channel("stable", "1.2.0", 10.0, floors=["1.1.0", "1.0.5", "1.1.0"])
    ch = store.channel("stable")
    assert ch.version == "1.2.0" and ch.floors == ("1.0.5", "1.1.0")
    store.set_channel("stable", None, 11.0)  # follow the newest; floors kept
    assert store.channel("stable").version is None and store.channel("stable").floors == ("1.0.5", "1.1.0")
    g = store.set_policy("prod", {"max_updates_per_period": 5, "period": "30m", "safe_mode": True}, 12.0)
    assert g.channel == "prod" and g.policy.max_updates_per_period == 5 and g.policy.period == "30m"
    g = store.set_policy("prod", {"period": "2h"}, 13.0)  # merged, not replaced
    assert g.policy.max_updates_per_period == 5 and g.policy.period == "2h" and g.policy.safe_mode
    store.put_group("prod", 14.0, channel="stable")
    assert store.group("prod").channel == "stable"
    assert store.pause("prod", 15.0).paused
    r = store.resume("prod", 16.0)
    assert not r.paused and not r.halted
    assert [g.name for g in store.groups()] == ["prod"]
    with pytest.raises(NotFound):
        store.group("nope")
    with pytest.raises(NotFound):
        store.pause("nope", 1.0)


BAD_POLICIES = [
    {"max_updates_per_period": 0},
    {"max_updates_per_period": -3},
    {"max_updates_per_period": "5"},
    {"max_updates_per_period": True},
    {"max_updates_per_period": 2.5},
    {"period": "0s"},
    {"period": "soon"},
    {"period": 60},
    {"period": "400d"},
    {"soak": "-1h"},
    {"windows": "Mon..Fri 25:00 1h"},
    {"windows": "Funday 09:00 1h"},
    {"windows": "Mon 09:00 0s"},
    {"timezone": "Mars/Olympus"},
    {"waves": [["1h", 0]]},
    {"waves": [["1h", 150]]},
    {"waves": [["2h", 10], ["1h", 20]]},
    {"waves": [["1h", 50], ["2h", 20]]},
    {"waves": [["1h"]]},
    {"waves": "1h 10%"},
    {"halt_failure_share": 0},
    {"halt_failure_share": 1.5},
    {"halt_window": 0},
    {"halt_window": 10**9},
    {"updates_enabled": "yes"},
    {"safe_mode": 1},
    {"no_such_field": 1},
    {"windows": "Mon 09:00 1h\nSat 04:00 1h"},
]


@pytest.mark.parametrize("bad", BAD_POLICIES, ids=[json.dumps(b)[:40] for b in BAD_POLICIES])
def test_bad_policy_values_store_nothing(store: Store, bad: dict) -> None:
    store.set_policy("prod", {"max_updates_per_period": 7}, 1.0)
    before = store.group("prod").to_dict()
    with pytest.raises(PolicyError) as e:
        store.set_policy("prod", {"period": "5m", **bad}, 2.0)  # a good change with a bad one: neither lands
    assert "\n" not in str(e.value) and str(e.value).startswith("policy")
    assert store.group("prod").to_dict() == before
    with pytest.raises(PolicyError):
        store.set_policy("fresh", bad, 3.0)
    with pytest.raises(NotFound):
        store.group("fresh")


@pytest.mark.parametrize("name", ["", "a b", "x" * 65, "-lead", "ünï", "a/b", "a;drop table groups"])
def test_bad_names_are_refused(store: Store, name: str) -> None:
    with pytest.raises(PolicyError, match="not valid"):
        store.set_policy(name, {}, 1.0)
    with pytest.raises(PolicyError, match="not valid"):
        store.set_channel(name, "1.0.0", 1.0)
    assert store.groups() == [] and store.channels() == []


@pytest.mark.parametrize("version,floors", [("one", None), ("1.0.0 ", None), ("1.0.0", ["x"]), ("1.0.0", "1.0.0"),
                                            ("1.0.0", [1])])
def test_bad_channel_values_store_nothing(store: Store, version: str, floors) -> None:  # noqa: ANN001
    with pytest.raises(PolicyError):
        store.set_channel("stable", version, 1.0, floors=floors)
    assert store.channels() == []


def test_release_publish_time_is_first_sight(store: Store) -> None:
    assert store.note_release("APP", "1.0.0", 100.0) == 100.0
    assert store.note_release("app", "1.0.0", 200.0) == 100.0
    store.set_published("app", "1.0.0", 50.0)
    assert store.note_release("app", "1.0.0", 300.0) == 50.0
