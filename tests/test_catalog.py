"""The event-type catalog: `dispatcher events`, `[events] extra`, and endpoint filters checked
against it by `endpoint add` and `endpoint update`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dispatcher.catalog import CATALOG, check_filters
from dispatcher.config import ConfigError, load_config
from dispatcher.endpoints import InvalidEndpoint
from tests.conftest import Db
from tests.test_cli import URL, add_endpoint, assert_one_error_line, base_env, cli, db_env

PLATFORMS = {"Glow", "Mage Loyalty", "Open Loyalty", "Loyali", "CustomerGlu"}


async def test_events_json_lists_every_catalog_type_then_the_configs_extra_types() -> None:
    env = base_env(DISPATCHER_EVENTS_EXTRA="acme.gift_card.sent,points.earned")
    listed, plain = await asyncio.gather(cli("events", "--json", env=env), cli("events", env=env))
    types = listed.json()
    names = [t["name"] for t in types]
    # The config's extra types come last; one already in the catalog is not listed twice.
    assert names == [e.name for e in CATALOG] + ["acme.gift_card.sent"]
    assert types[-1]["kind"] == "custom"
    for t in types[:-1]:
        assert t["description"], t
        assert "\n" not in t["description"], t
        assert t["kind"] in ("loyalty", "operational"), t
        # A loyalty type says which platforms' events it stands for; operational ones are ours.
        assert bool(t["platforms"]) == (t["kind"] == "loyalty"), t
        assert set(t["platforms"]) <= PLATFORMS, t
    # Every platform whose documentation the catalog is drawn from is represented.
    assert set().union(*(t["platforms"] for t in types)) == PLATFORMS
    assert plain.rc == 0, plain
    assert plain.out.splitlines()[0].split() == ["NAME", "DESCRIPTION"]
    for t in types:
        assert any(line.startswith(t["name"] + " ") for line in plain.out.splitlines()), t


def test_the_catalog_covers_the_loyalty_lifecycle_with_unique_dotted_names() -> None:
    names = [e.name for e in CATALOG]
    assert len(names) == len(set(names))
    for required in (
        "customer.created",
        "customer.updated",
        "points.earned",
        "points.redeemed",
        "points.expired",
        "points.adjusted",
        "points.expiring",
        "tier.upgraded",
        "tier.downgraded",
        "reward.redeemed",
        "redemption.approved",
        "referral.completed",
        "birthday.rewarded",
        "anniversary.rewarded",
        "achievement.earned",
        "social.shared",
        "review.created",
    ):
        assert required in names


def test_a_filter_entry_matches_like_the_database_does_exact_prefix_wildcard_or_star() -> None:
    known = ["points.earned", "tier.upgraded", "acme.gift.card"]
    ok = ["points.earned", "points.*", "acme.*", "acme.gift.*", "*"]
    assert check_filters(ok, known) == ok
    for bad in ("points", "point.*", "tier.upgraded.*", "gift.*"):
        with pytest.raises(InvalidEndpoint):
            check_filters([bad], known)


# [events] extra --------------------------------------------------------------------------------


def test_events_extra_comes_from_the_file_and_the_environment_overrides_it(tmp_path: Path) -> None:
    path = tmp_path / "d.toml"
    path.write_text('[events]\nextra = ["acme.one", "acme.two"]\n', encoding="utf-8")
    assert load_config(path, environ={}).events.extra == ("acme.one", "acme.two")
    env = {"DISPATCHER_EVENTS_EXTRA": " acme.three , acme-x.y_z "}
    assert load_config(path, environ=env).events.extra == ("acme.three", "acme-x.y_z")
    assert load_config(None, environ={"DISPATCHER_EVENTS_EXTRA": ""}).events.extra == ()


@pytest.mark.parametrize(
    ("toml", "env", "source"),
    [
        ('[events]\nextra = ["acme.*"]\n', {}, "d.toml"),
        ("[events]\nextra = 5\n", {}, "d.toml"),
        ("[events]\nextra = [1]\n", {}, "d.toml"),
        (None, {"DISPATCHER_EVENTS_EXTRA": "acme one"}, "DISPATCHER_EVENTS_EXTRA"),
    ],
    ids=["wildcard", "not-a-list", "not-strings", "space-in-env"],
)
def test_an_extra_entry_that_is_not_an_event_type_is_a_config_error_naming_key_and_source(
    tmp_path: Path, toml: str | None, env: dict[str, str], source: str
) -> None:
    path = tmp_path / "d.toml"
    if toml is not None:
        path.write_text(toml, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path if toml is not None else None, environ=env)
    assert "[events] extra" in str(info.value)
    assert source in str(info.value)


# endpoint add / update -------------------------------------------------------------------------


async def test_endpoint_add_refuses_filter_entries_matching_no_catalog_type_and_suggests_names(
    db: Db,
) -> None:
    run = await cli(
        "endpoint",
        "add",
        "--tenant",
        "t",
        "--url",
        URL,
        "--events",
        "points.earned,point.redeemed,teir.*,zzz",
        env=db_env(db),
    )
    line = assert_one_error_line(
        run,
        "'point.redeemed'",
        "did you mean points.redeemed",
        "'teir.*'",
        "did you mean tier.*",
        "'zzz' matches no event type",
        "--allow-unknown-events",
    )
    assert run.rc == 1
    assert "'points.earned'" not in line
    assert await db.count("SELECT count(*) FROM endpoints") == 0


async def test_endpoint_add_accepts_wildcards_and_custom_types_when_allowed_or_configured(
    db: Db,
) -> None:
    wildcards, allowed, configured = await asyncio.gather(
        add_endpoint(db, "--events", "points.*,tier.upgraded,*"),
        add_endpoint(db, "--events", "acme.gift_card.sent", "--allow-unknown-events"),
        cli(
            "endpoint",
            "add",
            "--tenant",
            "t",
            "--url",
            URL,
            "--events",
            "acme.*",
            "--json",
            env=db_env(db, DISPATCHER_EVENTS_EXTRA="acme.gift_card.sent"),
        ),
    )
    rows = {
        r["id"]: list(r["event_types"])
        for r in await db.conn.fetch("SELECT id, event_types FROM endpoints")
    }
    assert rows == {
        wildcards["id"]: ["points.*", "tier.upgraded", "*"],
        allowed["id"]: ["acme.gift_card.sent"],
        configured.json()["id"]: ["acme.*"],
    }


async def test_endpoint_update_refuses_an_unknown_filter_but_keeps_already_stored_custom_types(
    db: Db,
) -> None:
    added = await add_endpoint(db, "--events", "acme.thing", "--allow-unknown-events")
    eid = str(added["id"])
    env = db_env(db)
    refused = await cli("endpoint", "update", eid, "--events", "redemtion.approved", env=env)
    assert_one_error_line(refused, "'redemtion.approved'", "did you mean redemption.approved")
    assert list(await db.conn.fetchval("SELECT event_types FROM endpoints")) == ["acme.thing"]

    kept = await cli(
        "endpoint", "update", eid, "--events", "acme.thing,redemption.*", "--json", env=env
    )
    assert kept.json()["events"] == ["acme.thing", "redemption.*"]
    refused_new = await cli("endpoint", "update", eid, "--events", "acme.other", env=env)
    assert_one_error_line(refused_new, "'acme.other'")
