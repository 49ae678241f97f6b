"""The event-type catalog: the dotted names endpoints subscribe to, and filter checks against it.

The default catalog is drawn from the webhook documentation of the loyalty platforms merchants
migrate from (Glow, Mage Loyalty, Open Loyalty, Loyali, CustomerGlu), followed by the
dispatcher's own operational events (dispatcher.ops); `[events] extra` in the config adds a
deployment's own types. The database does not know the catalog: the backend may
insert any well-formed type, and a filter naming an unknown one is refused only by the CLI.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .endpoints import InvalidEndpoint
from .ops import OPS_EVENT_TYPES

__all__ = ["CATALOG", "EventType", "catalog", "check_filters", "unknown_filter_message"]


@dataclass(frozen=True, slots=True)
class EventType:
    """One subscribable event type; `platforms` pairs each platform with its own event names.
    `kind`: "loyalty" (the backend's), "operational" (the dispatcher's own) or "custom" (config)."""

    name: str
    description: str
    platforms: tuple[tuple[str, tuple[str, ...]], ...] = ()
    kind: str = "loyalty"

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "description": self.description,
            "kind": self.kind,
            "platforms": {platform: list(names) for platform, names in self.platforms},
        }


def _e(name: str, description: str, **platforms: tuple[str, ...]) -> EventType:
    # Keyword names cannot hold spaces; "Open_Loyalty" reads as "Open Loyalty".
    return EventType(
        name, description, tuple((p.replace("_", " "), n) for p, n in platforms.items())
    )


_GLOW_SUBMISSION = ("Member Custom Reward Submission State",)
_GLOW_TIER = ("Member VIP Tier Changed",)

CATALOG: tuple[EventType, ...] = (
    _e(
        "customer.created",
        "A customer joined the loyalty program",
        Glow=("New Member",),
        Loyali=("customer.created",),
        Open_Loyalty=("CustomerRegistered",),
    ),
    _e("customer.updated", "A customer's profile changed", Loyali=("customer.updated",)),
    _e(
        "order.placed",
        "A customer placed an order (the purchase that usually earns points)",
        Glow=("Member Order Placed",),
    ),
    _e(
        "points.earned",
        "A customer earned points",
        Mage_Loyalty=("points.earned",),
        Loyali=("points.earned",),
    ),
    _e(
        "points.redeemed",
        "A customer spent points, usually on a reward",
        Mage_Loyalty=("points.redeemed",),
        Loyali=("points.redeemed",),
    ),
    _e(
        "points.expired",
        "Points expired (e.g. after inactivity)",
        Glow=("Member Points Expired",),
        Loyali=("points.expired",),
    ),
    _e(
        "points.adjusted",
        "Points added or removed by hand, from the admin or the API",
        Glow=("Member Manual Points Adjustment", "Member Manual Points Adjustment API"),
        Loyali=("points.adjusted",),
    ),
    _e(
        "points.expiring",
        "Reminder: some of a customer's points expire soon",
        Glow=("Member Points Expiration Reminder",),
    ),
    _e(
        "points.reminder",
        "Reminder of a customer's points balance",
        Glow=("Member Points Reminder",),
    ),
    _e(
        "tier.upgraded",
        "A customer moved up to a higher (VIP) tier",
        Glow=_GLOW_TIER,
        Mage_Loyalty=("customer.tier_upgrade",),
        Loyali=("tier.upgraded",),
    ),
    _e(
        "tier.downgraded",
        "A customer moved down to a lower (VIP) tier",
        Glow=_GLOW_TIER,
        Mage_Loyalty=("customer.tier_downgrade",),
        Loyali=("tier.downgraded",),
    ),
    _e(
        "reward.issued",
        "A customer won or was granted a reward (coupon, cashback, merchandise, points)",
        CustomerGlu=("Rewards Webhook",),
    ),
    _e(
        "reward.redeemed",
        "A customer redeemed a reward (by hand or automatically); see redemption.* after it",
        Glow=("Member Redeemed Reward", "Member Redeemed Automatic Reward"),
        Loyali=("redemption.created",),
    ),
    _e(
        "reward.reminder",
        "Reminder of an unused reward or discount code",
        Glow=("Member Discount Code Reminder",),
    ),
    _e(
        "redemption.pending",
        "A redemption awaits approval",
        Glow=_GLOW_SUBMISSION,
        Loyali=("redemption.pending",),
    ),
    _e(
        "redemption.approved",
        "A redemption was approved",
        Glow=_GLOW_SUBMISSION,
        Loyali=("redemption.approved",),
    ),
    _e(
        "redemption.rejected",
        "A redemption was rejected",
        Glow=_GLOW_SUBMISSION,
        Loyali=("redemption.rejected",),
    ),
    _e(
        "redemption.fulfilled",
        "A redeemed reward was delivered",
        Loyali=("redemption.fulfilled",),
    ),
    _e(
        "redemption.cancelled",
        "A redemption was cancelled and its points refunded",
        Loyali=("redemption.cancelled",),
    ),
    _e(
        "referral.completed",
        "A referred friend joined or ordered, and the referrer was credited",
        Glow=("Member Referred",),
        CustomerGlu=("Rewards Webhook (referral reward)",),
    ),
    _e(
        "birthday.rewarded",
        "A customer received their birthday points or reward",
        Glow=("Member Awarded Birthday Points",),
    ),
    _e(
        "anniversary.rewarded",
        "A customer received their membership anniversary points or reward",
        Glow=("Member Awarded Anniversary Points",),
    ),
    _e(
        "achievement.earned",
        "A customer earned an achievement or badge",
        Loyali=("achievement.earned",),
    ),
    _e(
        "achievement.progressed",
        "A customer's progress towards an achievement changed",
        Open_Loyalty=("MemberAchievementProgressWasChanged",),
    ),
    _e(
        "social.followed",
        "A customer followed the brand on a social network",
        Glow=("Member Instagram Follow", "Member TikTok Follow", "Member X Follow"),
    ),
    _e("social.liked", "A customer liked the brand's page", Glow=("Member Facebook Like",)),
    _e(
        "social.shared",
        "A customer shared the brand on a social network",
        Glow=("Member Facebook Share", "Member X Share"),
    ),
    _e("review.created", "A customer left a product review", Glow=("Member Judge.me Review",)),
    *(EventType(name, about, kind="operational") for name, about in OPS_EVENT_TYPES.items()),
)


def catalog(extra: Iterable[str] = ()) -> list[EventType]:
    """The default catalog followed by `extra` names it does not already hold (from config)."""
    found = list(CATALOG)
    seen = {e.name for e in found}
    for name in extra:
        if name not in seen:
            seen.add(name)
            found.append(EventType(name, "custom event type ([events] extra)", kind="custom"))
    return found


def check_filters(
    patterns: Sequence[str], known: Iterable[str], *, keep: Iterable[str] = ()
) -> list[str]:
    """`patterns` if each matches a known type (exact, `prefix.*` or `*`), else InvalidEndpoint
    naming every entry that matches nothing; entries in `keep` (already stored) pass as they are."""
    names = sorted(set(known))
    kept = set(keep)
    unknown = [p for p in patterns if p not in kept and not _matches_any(p, names)]
    if unknown:
        raise InvalidEndpoint(
            "events: "
            + "; ".join(unknown_filter_message(p, names) for p in unknown)
            + "; see `dispatcher events`, or pass --allow-unknown-events for a custom type"
        )
    return list(patterns)


def unknown_filter_message(pattern: str, names: Sequence[str]) -> str:
    """'x' matches no event type, with the closest names or wildcards when there are any."""
    if pattern.endswith(".*"):
        candidates = sorted({n.rsplit(".", 1)[0] + ".*" for n in names if "." in n})
    else:
        candidates = list(names)
    close = difflib.get_close_matches(pattern, candidates, n=3, cutoff=0.6)
    # Only those about as close as the closest: "points.redeemed", not also "points.earned".
    best = _similarity(pattern, close[0]) if close else 0.0
    close = [c for c in close if _similarity(pattern, c) >= best - 0.1]
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    return f"{pattern!r} matches no event type in the catalog{hint}"


def _similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b).ratio()


def _matches_any(pattern: str, names: Sequence[str]) -> bool:
    # The same rule as the database's event_matches(): `*`, an exact name, or a name prefix.
    if pattern == "*" or pattern in names:
        return True
    if pattern.endswith(".*"):
        prefix = pattern[:-1]
        return any(n.startswith(prefix) for n in names)
    return False
