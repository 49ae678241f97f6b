"""Signatures from dispatcher.signing verify with independent receiver-side implementations."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from datetime import UTC, datetime

import pytest
import standardwebhooks
import stripe
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.endpoints import Endpoint
from dispatcher.secretbox import SecretBox
from dispatcher.signing import (
    PROFILES,
    SigningError,
    SigningProfile,
    fingerprint,
    generate_secret,
    sign,
    validate_secret,
)

BODY = json.dumps(
    {
        "id": "evt_1",
        "type": "points.earned",
        "tenant": "my-store",
        "timestamp": "2026-11-23T10:00:00Z",
        "data": {"customer_id": "cust_123", "amount": 150, "new_balance": 2350},
    },
    separators=(",", ":"),
).encode()
TAMPERED = BODY.replace(b"150", b"999")
EVENT_ID = "evt_01HZX5"
# A Svix-style secret (24 bytes) and a dispatcher-style one (32 bytes).
STD_OLD = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
STD_NEW = "whsec_" + base64.b64encode(bytes(range(32))).decode()
PLAIN_OLD = "old-shared-secret-0123456789"
PLAIN_NEW = "new-shared-secret-abcdefghij"


def now() -> int:
    return int(time.time())


def hmac_recipe(secret: str, msg: bytes, algorithm: str = "sha256", encoding: str = "hex") -> str:
    """What a receiver computes: HMAC of the raw bytes keyed by the secret's UTF-8 bytes."""
    digest = hmac.new(secret.encode(), msg, getattr(hashlib, algorithm)).digest()
    return base64.b64encode(digest).decode() if encoding == "base64" else digest.hex()


# standard


def test_standard_signature_verifies_with_standardwebhooks_library() -> None:
    headers = sign(SigningProfile(), [STD_NEW], EVENT_ID, now(), BODY)
    assert standardwebhooks.Webhook(STD_NEW).verify(BODY, headers) == json.loads(BODY)
    assert headers["webhook-id"] == EVENT_ID


def test_standard_signature_equals_library_computed_signature() -> None:
    ts = now()
    headers = sign(SigningProfile(), [STD_OLD], EVENT_ID, ts, BODY)
    expected = standardwebhooks.Webhook(STD_OLD).sign(
        EVENT_ID, datetime.fromtimestamp(ts, tz=UTC), BODY.decode()
    )
    assert headers == {
        "webhook-id": EVENT_ID,
        "webhook-timestamp": str(ts),
        "webhook-signature": expected,
    }


def test_standard_signature_during_rotation_verifies_with_either_secret() -> None:
    headers = sign(SigningProfile(), [STD_NEW, STD_OLD], EVENT_ID, now(), BODY)
    assert len(headers["webhook-signature"].split(" ")) == 2
    standardwebhooks.Webhook(STD_NEW).verify(BODY, headers)
    standardwebhooks.Webhook(STD_OLD).verify(BODY, headers)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(generate_secret("standard")).verify(BODY, headers)


def test_standard_signature_rejects_tampered_body() -> None:
    headers = sign(SigningProfile(), [STD_NEW], EVENT_ID, now(), BODY)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(STD_NEW).verify(TAMPERED, headers)


def test_standard_signature_rejects_other_event_id() -> None:
    headers = sign(SigningProfile(), [STD_NEW], EVENT_ID, now(), BODY)
    headers["webhook-id"] = "evt_other"
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(STD_NEW).verify(BODY, headers)


def test_standard_sign_accepts_unpadded_secret() -> None:
    padded = STD_NEW
    assert padded.endswith("=")
    headers = sign(SigningProfile(), [padded.rstrip("=")], EVENT_ID, now(), BODY)
    standardwebhooks.Webhook(padded).verify(BODY, headers)


@pytest.mark.parametrize("event_id", ["", "evt\r\nX-Injected: 1", "evt\x00"])
def test_standard_sign_rejects_event_id_unfit_for_a_header(event_id: str) -> None:
    with pytest.raises(SigningError):
        sign(SigningProfile(), [STD_NEW], event_id, now(), BODY)


def test_standard_sign_rejects_malformed_secret_without_quoting_it() -> None:
    bad = "whsec_not-base64-but-urlsafe_" + "A" * 20
    with pytest.raises(SigningError) as info:
        sign(SigningProfile(), [bad], EVENT_ID, now(), BODY)
    assert bad not in str(info.value)


# stripe


def test_stripe_signature_verifies_with_stripe_library() -> None:
    header = sign(SigningProfile("stripe"), [PLAIN_NEW], EVENT_ID, now(), BODY)["Stripe-Signature"]
    assert stripe.WebhookSignature.verify_header(BODY, header, PLAIN_NEW)
    event = stripe.Webhook.construct_event(BODY.decode(), header, PLAIN_NEW)
    assert event["type"] == "points.earned"


def test_stripe_signature_during_rotation_verifies_with_either_secret() -> None:
    header = sign(SigningProfile("stripe"), [PLAIN_NEW, PLAIN_OLD], EVENT_ID, now(), BODY)[
        "Stripe-Signature"
    ]
    assert header.count(",v1=") == 2
    assert stripe.WebhookSignature.verify_header(BODY, header, PLAIN_NEW)
    assert stripe.WebhookSignature.verify_header(BODY, header, PLAIN_OLD)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.WebhookSignature.verify_header(BODY, header, "some-unrelated-secret")


def test_stripe_signature_rejects_tampered_body() -> None:
    header = sign(SigningProfile("stripe"), [PLAIN_NEW], EVENT_ID, now(), BODY)["Stripe-Signature"]
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.WebhookSignature.verify_header(TAMPERED, header, PLAIN_NEW)


def test_stripe_profile_uses_configured_header_and_whsec_secret_as_plain_string() -> None:
    secret = generate_secret("stripe")
    profile = SigningProfile("stripe", header="X-Loyali-Signature")
    headers = sign(profile, [secret], EVENT_ID, now(), BODY)
    assert list(headers) == ["X-Loyali-Signature"]
    assert stripe.WebhookSignature.verify_header(BODY, headers["X-Loyali-Signature"], secret)


# github and shopify


def test_github_signature_matches_receiver_recipe_and_uses_newest_secret_only() -> None:
    headers = sign(SigningProfile("github"), [PLAIN_NEW, PLAIN_OLD], EVENT_ID, now(), BODY)
    assert headers == {"X-Hub-Signature-256": "sha256=" + hmac_recipe(PLAIN_NEW, BODY)}
    assert not hmac.compare_digest(
        headers["X-Hub-Signature-256"], "sha256=" + hmac_recipe(PLAIN_NEW, TAMPERED)
    )


def test_shopify_signature_matches_receiver_recipe_under_configured_header() -> None:
    profile = SigningProfile("shopify", header="X-Glow-Hmac-Sha256")
    headers = sign(profile, [PLAIN_NEW, PLAIN_OLD], EVENT_ID, now(), BODY)
    assert headers == {"X-Glow-Hmac-Sha256": hmac_recipe(PLAIN_NEW, BODY, encoding="base64")}
    default = sign(SigningProfile("shopify"), [PLAIN_NEW], EVENT_ID, now(), BODY)
    assert default == {"X-Shopify-Hmac-Sha256": hmac_recipe(PLAIN_NEW, BODY, encoding="base64")}


# hmac


def test_hmac_customerglu_recipe_is_sha1_hex_of_body() -> None:
    profile = SigningProfile("hmac", header="X-CG-SIGNATURE", algorithm="sha1")
    profile.validate()
    headers = sign(profile, [PLAIN_NEW], EVENT_ID, now(), BODY)
    assert headers == {"X-CG-SIGNATURE": hmac_recipe(PLAIN_NEW, BODY, "sha1")}
    assert len(headers["X-CG-SIGNATURE"]) == 40


def test_hmac_sha512_base64_over_timestamp_and_body_sets_timestamp_header() -> None:
    profile = SigningProfile(
        "hmac",
        header="X-Sig",
        algorithm="sha512",
        encoding="base64",
        signed="timestamp.body",
        timestamp_header="X-Sig-Timestamp",
    )
    profile.validate()
    headers = sign(profile, [PLAIN_NEW], EVENT_ID, now(), BODY)
    # The receiver rebuilds the signed bytes from the timestamp header it was sent.
    signed = headers["X-Sig-Timestamp"].encode() + b"." + BODY
    assert headers["X-Sig"] == hmac_recipe(PLAIN_NEW, signed, "sha512", "base64")
    assert headers["X-Sig"] != hmac_recipe(
        PLAIN_NEW, headers["X-Sig-Timestamp"].encode() + b"." + TAMPERED, "sha512", "base64"
    )


def test_hmac_prefix_precedes_each_value_joined_by_comma_space_during_rotation() -> None:
    profile = SigningProfile("hmac", algorithm="sha1", prefix="sha1=")
    headers = sign(profile, [PLAIN_NEW, PLAIN_OLD], EVENT_ID, now(), BODY)
    assert headers == {
        "X-Webhook-Signature": "sha1="
        + hmac_recipe(PLAIN_NEW, BODY, "sha1")
        + ", sha1="
        + hmac_recipe(PLAIN_OLD, BODY, "sha1")
    }


# profile validation and header names


@pytest.mark.parametrize(
    "profile",
    [
        SigningProfile(kind="svix"),
        SigningProfile(kind="standard", header="X-Signature"),
        SigningProfile(kind="stripe", header="Bad Header"),
        SigningProfile(kind="stripe", header="X-Sig\r\nX-Evil"),
        SigningProfile(kind="github", header=""),
        SigningProfile(kind="shopify", header="Content-Type"),
        SigningProfile(kind="github", algorithm="sha1"),
        SigningProfile(kind="shopify", encoding="base64"),
        SigningProfile(kind="stripe", prefix="v1="),
        SigningProfile(kind="standard", timestamp_header="X-Ts"),
        SigningProfile(kind="hmac", algorithm="md5"),
        SigningProfile(kind="hmac", encoding="base32"),
        SigningProfile(kind="hmac", signed="id.timestamp.body"),
        SigningProfile(kind="hmac", signed="timestamp.body"),
        SigningProfile(kind="hmac", prefix="sha1=\r\n"),
        SigningProfile(kind="hmac", prefix="sha1=\n"),
        SigningProfile(kind="hmac", timestamp_header="X-Ts\n"),
        SigningProfile(kind="hmac", timestamp_header="x-webhook-signature"),
        SigningProfile(kind="hmac", header="X-Sig", timestamp_header="Host"),
    ],
    ids=repr,
)
def test_validate_rejects_bad_profile(profile: SigningProfile) -> None:
    with pytest.raises(SigningError) as info:
        profile.validate()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "profile",
    [
        SigningProfile(),
        SigningProfile("stripe", header="X-Loyali-Signature"),
        SigningProfile("github"),
        SigningProfile("github", header="X-Mage-Signature"),
        SigningProfile("shopify"),
        SigningProfile("hmac", header="X-CG-SIGNATURE", algorithm="sha1"),
        SigningProfile(
            "hmac",
            algorithm="sha512",
            encoding="base64",
            signed="timestamp.body",
            prefix="t=",
            timestamp_header="X-Webhook-Timestamp",
        ),
    ],
    ids=repr,
)
def test_validate_accepts_good_profile_and_names_every_header_sign_sets(
    profile: SigningProfile,
) -> None:
    profile.validate()
    secret = generate_secret(profile.kind)
    headers = sign(profile, [secret], EVENT_ID, now(), BODY)
    assert profile.signature_header_names() == {name.lower() for name in headers}


def test_every_profile_kind_signs() -> None:
    for kind in PROFILES:
        assert sign(SigningProfile(kind), [generate_secret(kind)], EVENT_ID, now(), BODY)


def test_sign_requires_at_least_one_secret() -> None:
    with pytest.raises(SigningError):
        sign(SigningProfile(), [], EVENT_ID, now(), BODY)


# secrets


@pytest.mark.parametrize("kind", PROFILES)
def test_generated_secret_passes_validation_and_is_unique(kind: str) -> None:
    secret = generate_secret(kind)
    validate_secret(kind, secret)
    assert secret.startswith("whsec_")
    assert secret != generate_secret(kind)


def test_generated_standard_secret_is_32_bytes_accepted_by_standardwebhooks() -> None:
    secret = generate_secret("standard")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 32
    headers = sign(SigningProfile(), [secret], EVENT_ID, now(), BODY)
    standardwebhooks.Webhook(secret).verify(BODY, headers)


@pytest.mark.parametrize(
    "secret",
    [
        "",
        "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",  # no whsec_ prefix
        "whsec_" + base64.b64encode(b"x" * 23).decode(),  # too short
        "whsec_" + base64.b64encode(b"x" * 65).decode(),  # too long
        "whsec_" + base64.urlsafe_b64encode(b"\xff" * 32).decode(),  # urlsafe alphabet
        "whsec_" + base64.b64encode(b"x" * 32).decode() + " ",
        "whsec_AAAA====" + "A" * 40,
        "whsec_A" + "A" * 32,  # 33 base64 chars cannot be decoded
    ],
)
def test_validate_secret_rejects_bad_standard_secret(secret: str) -> None:
    with pytest.raises(SigningError):
        validate_secret("standard", secret)


@pytest.mark.parametrize(
    "secret",
    [
        "short",
        "x" * 15,
        "x" * 513,
        "has a space in it 0123",
        "tab\tseparated-secret-0123",
        "line\nbreak-secret-0123456",
        "non-ascii-secret-éééééé",
    ],
)
@pytest.mark.parametrize("kind", ["stripe", "github", "shopify", "hmac"])
def test_validate_secret_rejects_bad_plain_secret(kind: str, secret: str) -> None:
    with pytest.raises(SigningError) as info:
        validate_secret(kind, secret)
    assert secret not in str(info.value)


def test_validate_secret_accepts_svix_and_plain_secrets() -> None:
    validate_secret("standard", STD_OLD)
    validate_secret("standard", STD_NEW)
    validate_secret("stripe", "whsec_" + "a" * 32)
    validate_secret("hmac", "x" * 16)
    validate_secret("hmac", "!" * 512)


def test_validate_secret_rejects_unknown_kind() -> None:
    with pytest.raises(SigningError):
        validate_secret("svix", STD_NEW)
    with pytest.raises(SigningError):
        generate_secret("svix")


def test_fingerprint_is_short_stable_and_never_contains_the_secret() -> None:
    for secret in (STD_OLD, STD_NEW, PLAIN_OLD, "whsec_" + "0" * 40):
        fp = fingerprint(secret)
        assert fp == fingerprint(secret)
        assert fp.startswith("sha256:")
        assert len(fp) == len("sha256:") + 12
        assert secret not in fp
        assert secret.removeprefix("whsec_") not in fp
    assert fingerprint(PLAIN_OLD) != fingerprint(PLAIN_NEW)


# properties

event_ids = st.text(
    st.characters(codec="utf-8", blacklist_categories=("Cc", "Cs")), min_size=1, max_size=64
)
utf8_bodies = st.text(st.characters(codec="utf-8"), max_size=2048).map(str.encode)
plain_secrets = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=16, max_size=64
)
standard_secrets = st.binary(min_size=24, max_size=64).map(
    lambda key: "whsec_" + base64.b64encode(key).decode()
)


@settings(max_examples=200, deadline=None)
@given(
    event_id=event_ids,
    body=utf8_bodies,
    skew=st.integers(min_value=-240, max_value=240),
    keys=st.lists(standard_secrets, min_size=1, max_size=3),
)
def test_property_standard_signature_verifies_with_standardwebhooks_for_every_secret(
    event_id: str, body: bytes, skew: int, keys: list[str]
) -> None:
    headers = sign(SigningProfile(), keys, event_id, now() + skew, body)
    for key in keys:
        assert standardwebhooks.Webhook(key).verify(body, headers, json_parse=False) is None


@settings(max_examples=200, deadline=None)
@given(
    body=st.binary(max_size=2048),
    timestamp=st.integers(min_value=0, max_value=2**40),
    algorithm=st.sampled_from(["sha1", "sha256", "sha512"]),
    encoding=st.sampled_from(["hex", "base64"]),
    signed=st.sampled_from(["body", "timestamp.body"]),
    prefix=st.sampled_from(["", "sha1=", "v1,", "sig "]),
    keys=st.lists(plain_secrets, min_size=1, max_size=3),
)
def test_property_hmac_signature_verifies_with_receiver_recipe(
    body: bytes,
    timestamp: int,
    algorithm: str,
    encoding: str,
    signed: str,
    prefix: str,
    keys: list[str],
) -> None:
    profile = SigningProfile(
        "hmac",
        header="X-Sig",
        algorithm=algorithm,
        encoding=encoding,
        signed=signed,
        prefix=prefix,
        timestamp_header="X-Ts" if signed == "timestamp.body" else None,
    )
    profile.validate()
    headers = sign(profile, keys, "evt_prop", timestamp, body)
    msg = headers["X-Ts"].encode() + b"." + body if signed == "timestamp.body" else body
    values = headers["X-Sig"].split(", ")
    assert len(values) == len(keys)
    for key, value in zip(keys, values, strict=True):
        assert value.startswith(prefix)
        assert hmac.compare_digest(value[len(prefix) :], hmac_recipe(key, msg, algorithm, encoding))


@settings(max_examples=100, deadline=None)
@given(
    body=utf8_bodies,
    skew=st.integers(min_value=-240, max_value=0),
    keys=st.lists(plain_secrets, min_size=1, max_size=3),
)
def test_property_stripe_signature_verifies_with_stripe_for_every_secret(
    body: bytes, skew: int, keys: list[str]
) -> None:
    header = sign(SigningProfile("stripe"), keys, "evt_prop", now() + skew, body)[
        "Stripe-Signature"
    ]
    for key in keys:
        assert stripe.WebhookSignature.verify_header(body, header, key)


@settings(max_examples=100, deadline=None)
@given(
    kind=st.sampled_from(["github", "shopify"]),
    body=st.binary(max_size=2048),
    keys=st.lists(plain_secrets, min_size=1, max_size=3),
)
def test_property_single_signature_profiles_verify_with_receiver_recipe_for_the_newest_secret(
    kind: str, body: bytes, keys: list[str]
) -> None:
    headers = sign(SigningProfile(kind), keys, "evt_prop", now(), body)
    if kind == "github":
        assert headers == {"X-Hub-Signature-256": "sha256=" + hmac_recipe(keys[0], body)}
    else:
        assert headers == {"X-Shopify-Hmac-Sha256": hmac_recipe(keys[0], body, encoding="base64")}


@settings(max_examples=50, deadline=None)
@given(body=utf8_bodies, key=standard_secrets, stripe_key=plain_secrets)
def test_property_secrets_stored_encrypted_sign_as_their_plaintext(
    body: bytes, key: str, stripe_key: str
) -> None:
    box = SecretBox(bytes(range(32)))
    for profile, secret in (("standard", key), ("stripe", stripe_key)):
        row = {
            "id": 1, "tenant": "t", "url": "https://example.com/h", "profile": profile,
            "signature_header": None, "algorithm": "sha256", "encoding": "hex",
            "signed": "body", "prefix": "", "timestamp_header": None,
            "secret": box.seal(secret), "old_secret": None, "old_secret_expires_at": None,
            "headers": {}, "ordered": False, "max_in_flight": None, "timeout_ms": None,
            "enabled": True, "version": 1, "envelope": None, "envelope_fields": None,
        }  # fmt: skip
        headers = Endpoint.from_row(row, box).request_headers(
            "evt_1", "points.earned", 1, body, datetime.now(UTC)
        )
        if profile == "standard":
            standardwebhooks.Webhook(secret).verify(body, headers, json_parse=False)
        else:
            assert stripe.WebhookSignature.verify_header(body, headers["Stripe-Signature"], secret)
