"""JWT request authentication at the waypoint: tokens made here with `cryptography` keys, checked
as Envoy's jwt_authn would (texts, order, locations, outputs), JWK sets inline, from a file and
from a URL on loopback (with refresh), and the data path's answers."""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from meshway.api.v1 import address_pb2
from meshway.api.v1 import authorization_pb2 as pb
from meshway.config.model import RequestAuthentication
from meshway.identity.spiffe import SpiffeId
from meshway.node.state import ProxyState
from meshway.policy import requestauth as ra
from meshway.policy.requestauth import Authenticator, RequestAuthIndex, parse_jwks
from meshway.telemetry.metrics import WaypointMetrics
from meshway.waypoint.jwks import (
    JwksCache,
    JwksFetcher,
    JwksFetchError,
    RemoteJwks,
    mesh_resolver,
)
from meshway.waypoint.messages import Body, Request, Response
from meshway.waypoint.proxy import AccessLog, Downstream, WaypointDataPath
from meshway.xds.client import Update
from meshway.xds.types import ADDRESS_TYPE, AUTHORIZATION_TYPE

pytestmark = pytest.mark.unit

ISSUER = "https://issuer.example"
OTHER_ISSUER = "https://other.example"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_KEY_2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def jwk(key: Any, kid: str) -> dict[str, Any]:
    public = key.public_key()
    algorithm = RSAAlgorithm if isinstance(public, rsa.RSAPublicKey) else ECAlgorithm
    data: dict[str, Any] = algorithm.to_jwk(public, as_dict=True)
    data["kid"] = kid
    return data


def jwks(*keys: dict[str, Any]) -> str:
    return json.dumps({"keys": list(keys)})


JWKS = jwks(jwk(RSA_KEY, "rsa-1"), jwk(EC_KEY, "ec-1"))


def token(
    claims: dict[str, Any] | None = None,
    *,
    key: Any = RSA_KEY,
    alg: str = "RS256",
    kid: str | None = "rsa-1",
    **extra: Any,
) -> str:
    now = int(time.time())
    payload = {"iss": ISSUER, "sub": "alice", "iat": now, "exp": now + 600, **(claims or {})}
    payload.update(extra)
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(payload, key, algorithm=alg, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def request_auth(*rules: dict[str, Any], name: str = "jwt", **spec: Any) -> RequestAuthentication:
    body: dict[str, Any] = {
        "targetRefs": [{"kind": "Service", "group": "", "name": "web"}],
        "jwtRules": list(rules),
    }
    body.update(spec)
    return RequestAuthentication.model_validate(
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "RequestAuthentication",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": body,
        }
    )


def authenticator(*rules: dict[str, Any], sources: Any = None) -> Authenticator:
    index = RequestAuthIndex([request_auth(*rules)], ("shop", "waypoint"), sources)
    found = index.for_target("shop", "web")
    assert found is not None
    return found


def req(
    headers: list[tuple[str, str]] | None = None, path: str = "/orders?x=1", method: str = "GET"
) -> Request:
    return Request(method, path, "web.shop", headers or [])


async def check(auth: Authenticator, request: Request) -> ra.AuthnResult:
    return await auth.authenticate(request, time.time())


def bearer(value: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {value}")]


RULE = {"issuer": ISSUER, "jwks": JWKS}


# -- verification --------------------------------------------------------------------------------


async def test_valid_rsa_and_ec_tokens_give_a_request_principal() -> None:
    auth = authenticator(RULE)
    for tok in (token(), token(key=EC_KEY, alg="ES256", kid="ec-1")):
        result = await check(auth, req(bearer(tok)))
        assert result.error is None and result.auth is not None
        assert result.auth.principal == f"{ISSUER}/alice"
        assert result.auth.claims["sub"] == "alice"


async def test_no_token_passes_without_a_principal() -> None:
    result = await check(authenticator(RULE), req([("accept", "*/*")]))
    assert result == ra.NO_TOKEN and result.auth is None and result.error is None


@pytest.mark.parametrize(
    ("make", "message", "status"),
    [
        (lambda: token(exp=int(time.time()) - 120), ra.EXPIRED, 401),
        (lambda: token(nbf=int(time.time()) + 120), ra.NOT_YET_VALID, 401),
        (lambda: token(iss=OTHER_ISSUER), ra.UNKNOWN_ISSUER, 401),
        (lambda: token(kid="rsa-unknown"), ra.KID_ALG_MISMATCH, 401),
        (lambda: token(key=RSA_KEY_2), ra.VERIFICATION_FAILS, 401),  # kid fits, signature not
        (lambda: "x.y", ra.BAD_FORMAT, 401),
        (lambda: "garbage", ra.BAD_FORMAT, 401),
        (lambda: "%%%.e30.e30", ra.HEADER_BAD_BASE64, 401),
        (lambda: f"{b64(b'not json')}.e30.sig", ra.HEADER_BAD_JSON, 401),
        (lambda: f"{b64(b'{}')}.e30.sig", ra.HEADER_BAD_ALG, 401),
        (lambda: b64(b'{"alg":"RS256"}') + "." + b64(b"[1") + ".sig", ra.PAYLOAD_BAD_JSON, 401),
    ],
)
async def test_invalid_tokens_get_envoys_answers(
    make: Callable[[], str], message: str, status: int
) -> None:
    result = await check(authenticator(RULE), req(bearer(make())))
    assert result.auth is None
    assert (result.error, result.status) == (message, status)
    assert result.details == "jwt_authn_access_denied{" + message.replace(" ", "_") + "}"


async def test_clock_skew_of_sixty_seconds_is_allowed() -> None:
    result = await check(authenticator(RULE), req(bearer(token(exp=int(time.time()) - 30))))
    assert result.auth is not None


async def test_tampered_payload_fails_verification() -> None:
    header, _, signature = token().split(".")
    forged = b64(json.dumps({"iss": ISSUER, "sub": "mallory", "exp": 2**40}).encode())
    result = await check(authenticator(RULE), req(bearer(f"{header}.{forged}.{signature}")))
    assert result.error == ra.VERIFICATION_FAILS


async def test_alg_none_and_hmac_with_a_public_key_are_refused() -> None:
    unsigned = jwt.encode({"iss": ISSUER, "sub": "mallory"}, None, algorithm="none")
    result = await check(authenticator(RULE), req(bearer(unsigned)))
    assert result.error == ra.HEADER_ALG_NOT_SUPPORTED
    # The classic confusion: HS256 "signed" with the RSA public key's PEM as the secret.
    pem = RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    import hashlib
    import hmac

    header = b64(json.dumps({"alg": "HS256", "kid": "rsa-1"}).encode())
    body = b64(json.dumps({"iss": ISSUER, "sub": "mallory"}).encode())
    sig = b64(hmac.new(pem, f"{header}.{body}".encode(), hashlib.sha256).digest())
    result = await check(authenticator(RULE), req(bearer(f"{header}.{body}.{sig}")))
    assert result.error == ra.KID_ALG_MISMATCH


async def test_audiences() -> None:
    auth = authenticator({**RULE, "audiences": ["https://shop.example/", "web"]})
    assert (await check(auth, req(bearer(token(aud="shop.example"))))).auth is not None
    assert (await check(auth, req(bearer(token(aud=["x", "web"]))))).auth is not None
    refused = await check(auth, req(bearer(token(aud="billing"))))
    assert (refused.error, refused.status) == (ra.AUDIENCE_NOT_ALLOWED, 403)  # Envoy: 403
    assert (await check(auth, req(bearer(token())))).error == ra.AUDIENCE_NOT_ALLOWED  # no aud
    # No audiences in the rule: none checked (what Istio configures Envoy with).
    assert (await check(authenticator(RULE), req(bearer(token(aud="any"))))).auth is not None


async def test_two_jwt_rules_each_with_its_issuer_and_keys() -> None:
    other_keys = jwks(jwk(RSA_KEY_2, "other-1"))
    auth = authenticator(RULE, {"issuer": OTHER_ISSUER, "jwks": other_keys})
    first = await check(auth, req(bearer(token())))
    second = await check(auth, req(bearer(token(iss=OTHER_ISSUER, key=RSA_KEY_2, kid="other-1"))))
    assert first.auth is not None and first.auth.issuer == ISSUER
    assert second.auth is not None and second.auth.principal == f"{OTHER_ISSUER}/alice"
    crossed = await check(auth, req(bearer(token(iss=OTHER_ISSUER, kid="other-1"))))
    assert crossed.error == ra.VERIFICATION_FAILS  # the other issuer's key does not verify it


def test_jwks_parsing_errors_and_skipped_keys() -> None:
    for text, message in (
        ("nope", ra.JWKS_BAD_JSON),
        ("{}", ra.JWKS_NO_KEYS),
        ('{"keys": {}}', ra.JWKS_BAD_KEYS),
        ('{"keys": [{"kty": "RSA"}]}', ra.JWKS_NO_VALID_KEYS),
    ):
        with pytest.raises(ra.JwksError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_jwks(text)
    keys = parse_jwks(jwks({"kty": "EC", "crv": "nope"}, jwk(EC_KEY, "ec-1")))
    assert [(k.kid, k.kty, k.crv) for k in keys] == [("ec-1", "EC", "P-256")]


async def test_rules_without_usable_keys_refuse_tokens_and_say_why() -> None:
    unusable = authenticator({"issuer": ISSUER, "jwks": jwks({"kty": "RSA", "kid": "x"})})
    assert (await check(unusable, req(bearer(token())))).error == ra.JWKS_NO_VALID_KEYS
    no_fetcher = authenticator({"issuer": ISSUER})  # discovery needs a fetcher
    assert (await check(no_fetcher, req(bearer(token())))).error == ra.JWKS_FETCH_FAILED
    assert (await check(no_fetcher, req())) == ra.NO_TOKEN


# -- locations and outputs -----------------------------------------------------------------------


async def test_default_locations_are_bearer_header_and_access_token_param() -> None:
    auth = authenticator(RULE)
    assert (await check(auth, req(path=f"/a?access_token={token()}"))).auth is not None
    assert (await check(auth, req([("authorization", f"bearer {token()}")]))).auth is not None
    assert (await check(auth, req([("authorization", "Basic dXNlcjpwYXNz")]))).auth is None
    assert (await check(auth, req([("x-token", token())]))) == ra.NO_TOKEN


async def test_headers_with_prefix_params_and_cookies() -> None:
    auth = authenticator(
        {
            **RULE,
            "fromHeaders": [{"name": "X-Jwt", "prefix": "Token "}],
            "fromParams": ["jwt"],
            "fromCookies": ["session"],
        }
    )
    good = token()
    assert (await check(auth, req([("x-jwt", f"Token {good}")]))).auth is not None
    assert (await check(auth, req(path=f"/a?b=1&jwt={good}"))).auth is not None
    cookie = [("cookie", f"theme=dark; session={good}")]
    assert (await check(auth, req(cookie))).auth is not None
    # The defaults no longer apply once locations are given.
    assert (await check(auth, req(bearer(good)))) == ra.NO_TOKEN
    assert (await check(auth, req(path=f"/a?access_token={good}"))) == ra.NO_TOKEN
    # A token without its prefix is not found; a bad one where it is looked for is refused.
    assert (await check(auth, req([("x-jwt", good)]))) == ra.NO_TOKEN
    assert (await check(auth, req([("x-jwt", "Token nonsense")]))).error == ra.BAD_FORMAT
    assert (await check(auth, req([("cookie", "session=a.b")]))).error == ra.BAD_FORMAT


async def test_one_valid_token_is_enough_when_several_are_present() -> None:
    auth = authenticator(RULE)
    result = await check(
        auth, req(bearer(token(exp=int(time.time()) - 600)), path=f"/?access_token={token()}")
    )
    assert result.auth is not None


async def test_claims_to_headers_payload_header_and_token_stripped() -> None:
    auth = authenticator(
        {
            **RULE,
            "outputClaimToHeaders": [
                {"header": "x-jwt-sub", "claim": "sub"},
                {"header": "x-jwt-groups", "claim": "groups"},
                {"header": "x-jwt-level", "claim": "org.level"},
                {"header": "x-jwt-admin", "claim": "admin"},
                {"header": "x-jwt-missing", "claim": "nothing"},
            ],
            "outputPayloadToHeader": "x-jwt-payload",
        }
    )
    tok = token({"groups": ["staff", "admin"], "org": {"level": 3}, "admin": True})
    request = req([*bearer(tok), ("x-jwt-sub", "spoofed"), ("accept", "*/*")])
    assert (await check(auth, request)).auth is not None
    headers = dict(request.headers)
    assert "authorization" not in headers  # forwardOriginalToken is false by default
    assert headers["x-jwt-sub"] == "alice"  # replaces what the client sent
    assert [k for k, _ in request.headers].count("x-jwt-sub") == 1
    assert headers["x-jwt-groups"] == "staff,admin"
    assert headers["x-jwt-level"] == "3"
    assert headers["x-jwt-admin"] == "true"
    assert "x-jwt-missing" not in headers
    assert headers["accept"] == "*/*"
    payload = base64.urlsafe_b64decode(headers["x-jwt-payload"] + "==")
    assert json.loads(payload)["groups"] == ["staff", "admin"]
    # Without a token, a client cannot pass such headers off as verified claims.
    spoofed = req([("x-jwt-sub", "admin"), ("x-jwt-payload", "e30"), ("accept", "*/*")])
    assert await check(auth, spoofed) == ra.NO_TOKEN
    assert spoofed.headers == [("accept", "*/*")]


async def test_forward_original_token_keeps_it_and_failures_change_nothing() -> None:
    keep = authenticator({**RULE, "forwardOriginalToken": True})
    tok = token()
    request = req(bearer(tok))
    assert (await check(keep, request)).auth is not None
    assert request.headers == bearer(tok)
    refused = req(bearer("bad.token"))
    assert (await check(authenticator(RULE), refused)).error is not None
    assert refused.headers == bearer("bad.token")


# -- attachment ----------------------------------------------------------------------------------


def test_mesh_resolver_names_ips_and_others() -> None:
    resolve = mesh_resolver(loopback_services, "cluster.local")
    assert resolve("issuer.auth.svc.cluster.local", 80) == ("127.0.0.1", 80)
    assert resolve("10.0.0.7", 8443) == ("10.0.0.7", 8443)
    assert resolve("[::1]", 80) == ("::1", 80)
    assert resolve("missing.auth.svc.cluster.local", 80) is None  # then DNS
    assert resolve("issuer.example", 443) is None


def test_only_target_refs_policies_attach_and_lookups_are_cached() -> None:
    on_web = request_auth(RULE, name="web")
    on_gateway = request_auth(
        RULE,
        name="gw",
        targetRefs=[{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}],
    )
    selector = request_auth(RULE, name="sel", targetRefs=[], selector={"matchLabels": {"a": "b"}})
    index = RequestAuthIndex([on_web, selector], ("shop", "waypoint"))
    web = index.for_target("shop", "web")
    assert web is not None and [r.policy for r in web.rules] == ["shop/web"]
    assert index.for_target("shop", "api") is None
    assert index.for_target("shop", "api") is None  # cached: a dictionary hit
    assert ("shop", "api") in index._by_target
    assert RequestAuthIndex([selector], ("shop", "waypoint")).empty
    both = RequestAuthIndex([on_web, on_gateway], ("shop", "waypoint"))
    found = both.for_target("shop", "web")
    assert found is not None and [r.policy for r in found.rules] == ["shop/gw", "shop/web"]
    api = both.for_target("shop", "api")
    assert api is not None and [r.policy for r in api.rules] == ["shop/gw"]


# -- JWK sets from files and URLs ------------------------------------------------------------------


async def test_jwks_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(JWKS)
    cache = JwksCache(JwksFetcher())
    try:
        auth = authenticator({"issuer": ISSUER, "jwksUri": f"file://{path}"}, sources=cache)
        assert (await check(auth, req(bearer(token())))).auth is not None
        missing = authenticator(
            {"issuer": ISSUER, "jwksUri": f"file://{tmp_path}/none.json"}, sources=cache
        )
        assert (await check(missing, req(bearer(token())))).error == ra.JWKS_FETCH_FAILED
        assert "none.json" in (cache.dump()[f"file://{tmp_path}/none.json"]["error"] or "")
    finally:
        cache.close()


class JwksServer:
    """A JWKS endpoint on loopback whose answer the test changes."""

    def __init__(self) -> None:
        self.status = 200
        self.body = JWKS
        self.hits = 0
        self.port = 0
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def handle(request: web.Request) -> web.Response:
            self.hits += 1
            return web.Response(status=self.status, text=self.body, content_type="application/json")

        async def discovery(request: web.Request) -> web.Response:
            base = f"http://{request.host}"
            return web.json_response({"issuer": base, "jwks_uri": f"{base}/jwks.json"})

        app = web.Application()
        app.router.add_get("/jwks.json", handle)
        app.router.add_get("/.well-known/openid-configuration", discovery)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def jwks_server() -> AsyncIterator[JwksServer]:
    server = JwksServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def loopback_services() -> dict[str, address_pb2.Service]:
    svc = address_pb2.Service(
        name="issuer",
        namespace="auth",
        hostname="issuer.auth.svc.cluster.local",
        addresses=[address_pb2.NetworkAddress(address=ipaddress.ip_address("127.0.0.1").packed)],
    )
    return {"auth/issuer.auth.svc.cluster.local": svc}


async def wait_for(predicate: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_jwks_from_a_url_resolved_from_mesh_state_and_refreshed(
    jwks_server: JwksServer,
) -> None:
    fetcher = JwksFetcher(mesh_resolver(loopback_services, "cluster.local"))
    cache = JwksCache(fetcher, refresh=0.1)
    uri = f"http://issuer.auth.svc.cluster.local:{jwks_server.port}/jwks.json"
    try:
        auth = authenticator({"issuer": ISSUER, "jwksUri": uri, "timeout": "2s"}, sources=cache)
        # The first token waits for the first load; later ones use the cached keys.
        assert (await check(auth, req(bearer(token())))).auth is not None
        # The server breaks: refreshes fail, the last good keys stay.
        jwks_server.status = 500
        failures_from = jwks_server.hits
        await wait_for(lambda: jwks_server.hits >= failures_from + 2)
        remote = cache._sets[(uri, 2.0, False)]
        assert remote.error is not None and "HTTP 500" in remote.error
        assert (await check(auth, req(bearer(token())))).auth is not None
        # Garbage is not taken either.
        jwks_server.status, jwks_server.body = 200, "<html>"
        await wait_for(lambda: remote.error == ra.JWKS_BAD_JSON)
        assert (await check(auth, req(bearer(token())))).auth is not None
        # Keys rotate: the new key's tokens pass once the refresh has them.
        jwks_server.body = jwks(jwk(RSA_KEY_2, "rsa-2"))
        rotated = token(key=RSA_KEY_2, kid="rsa-2")
        await wait_for(
            lambda: (
                remote.error is None and remote.keys is not None and remote.keys[0].kid == "rsa-2"
            )
        )
        assert (await check(auth, req(bearer(rotated)))).auth is not None
        assert (await check(auth, req(bearer(token())))).error == ra.KID_ALG_MISMATCH
    finally:
        cache.close()


async def test_jwks_over_https_with_the_servers_name_checked(tmp_path: Path) -> None:
    import datetime
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer.auth.svc.cluster.local")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("issuer.auth.svc.cluster.local")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    client_ctx = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))

    async def handle(request: web.Request) -> web.Response:
        return web.Response(text=JWKS, content_type="application/json")

    app = web.Application()
    app.router.add_get("/jwks.json", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        resolve = mesh_resolver(loopback_services, "cluster.local")
        trusted = JwksFetcher(resolve, ssl_context=client_ctx)
        data = await trusted(f"https://issuer.auth.svc.cluster.local:{port}/jwks.json", 5.0)
        assert parse_jwks(data)[0].kid == "rsa-1"
        with pytest.raises(JwksFetchError):  # the host's CA bundle does not know this server
            await JwksFetcher(resolve)(f"https://issuer.auth.svc.cluster.local:{port}/x", 5.0)
        with pytest.raises(JwksFetchError):  # the name is checked, not just the chain
            await trusted(f"https://127.0.0.1:{port}/jwks.json", 5.0)
    finally:
        await runner.cleanup()


async def test_jwks_by_openid_discovery_of_the_issuer(jwks_server: JwksServer) -> None:
    fetcher = JwksFetcher(mesh_resolver(loopback_services, "cluster.local"))
    cache = JwksCache(fetcher)
    issuer = f"http://issuer.auth.svc.cluster.local:{jwks_server.port}"
    try:
        auth = authenticator({"issuer": issuer}, sources=cache)
        result = await check(auth, req(bearer(token(iss=issuer))))
        assert result.auth is not None and result.auth.principal == f"{issuer}/alice"
        assert jwks_server.hits == 1  # the set named by the discovery document
    finally:
        cache.close()


async def test_unreachable_jwks_gives_401_and_other_requests_do_not_wait() -> None:
    fetcher = JwksFetcher(mesh_resolver(loopback_services, "cluster.local"))
    cache = JwksCache(fetcher)
    # Port 9 on loopback: nothing listens, the connection is refused at once.
    uri = "http://issuer.auth.svc.cluster.local:9/jwks.json"
    try:
        auth = authenticator({"issuer": ISSUER, "jwksUri": uri, "timeout": "1s"}, sources=cache)
        assert (await check(auth, req([("accept", "*/*")]))) == ra.NO_TOKEN
        result = await check(auth, req(bearer(token())))
        assert (result.error, result.status) == (ra.JWKS_FETCH_FAILED, 401)
    finally:
        cache.close()


async def test_cache_keeps_sets_still_named_and_drops_the_others() -> None:
    async def fetch(uri: str, timeout: float) -> bytes:
        return JWKS.encode()

    cache = JwksCache(fetch)
    cache.begin()
    first = cache.source("http://a/jwks", 5.0)
    dropped = cache.source("http://b/jwks", 5.0)
    cache.end()
    await first.wait()
    cache.begin()
    assert cache.source("http://a/jwks", 5.0) is first  # not fetched again
    cache.end()
    assert set(cache.dump()) == {"http://a/jwks"} and first.loads == 1
    assert dropped._task is not None
    await asyncio.sleep(0)
    assert dropped._task.cancelled() or dropped._task.done()
    cache.close()


async def test_remote_jwks_without_a_running_loop_starts_on_first_use() -> None:
    calls: list[str] = []

    async def fetch(uri: str, timeout: float) -> bytes:
        calls.append(uri)
        return JWKS.encode()

    remote = RemoteJwks("http://x/jwks", 1.0, fetch)
    keys = await remote.wait()
    assert keys is not None and calls == ["http://x/jwks"]
    remote.close()


# -- the data path -------------------------------------------------------------------------------

WAYPOINT = "shop/waypoint.shop.svc.cluster.local"


class EchoUpstream:
    """Answers every request with the headers it received, as JSON."""

    def __init__(self) -> None:
        self.requests: list[Request] = []

    async def request(self, endpoint: Any, request: Request, http2: bool, *_: Any) -> Response:
        self.requests.append(request)
        body = json.dumps(dict(request.headers)).encode()
        return Response(200, [("content-type", "application/json")], Body.of(body))


def datapath(policies: list[pb.Authorization], authn: list[RequestAuthentication]) -> Any:
    state = ProxyState("node-1")
    svc = address_pb2.Service(
        name="web",
        namespace="shop",
        hostname="web.shop.svc.cluster.local",
        addresses=[address_pb2.NetworkAddress(address=ipaddress.ip_address("10.96.0.10").packed)],
        ports=[address_pb2.ServicePort(service_port=80, target_port=8080, app_protocol="http")],
    )
    svc.waypoint.service = WAYPOINT
    wl = address_pb2.Workload(
        uid="shop/web-1",
        name="web-1",
        namespace="shop",
        addresses=[ipaddress.ip_address("10.244.1.2").packed],
        service_account="web",
        trust_domain="cluster.local",
        tunnel_protocol=address_pb2.HBONE,
    )
    wl.services["shop/web.shop.svc.cluster.local"].ports.append(
        address_pb2.PortMapping(service_port=80, target_port=8080)
    )
    state.apply(
        Update(
            ADDRESS_TYPE,
            "1",
            {
                "shop/web.shop.svc.cluster.local": address_pb2.Address(service=svc),
                "shop/web-1": address_pb2.Address(workload=wl),
            },
            frozenset(),
        )
    )
    state.apply(
        Update(AUTHORIZATION_TYPE, "1", {f"shop/{p.name}": p for p in policies}, frozenset())
    )
    upstream = EchoUpstream()
    dp = WaypointDataPath(("shop", "waypoint"), WAYPOINT, state, WaypointMetrics(), upstream)  # type: ignore[arg-type]
    dp.access_log = AccessLog(io.StringIO())
    dp.update(authn=RequestAuthIndex(authn, ("shop", "waypoint")))
    dest = dp.destination("10.96.0.10", 80)
    assert dest is not None
    down = Downstream(SpiffeId("cluster.local", "shop", "client"), "10.244.0.9", None, dest)
    return dp, down, upstream


ADMINS_ONLY = pb.Authorization(
    name="admins",
    namespace="shop",
    scope=pb.TARGET_REF,
    action=pb.ALLOW,
    target_refs=[pb.TargetRef(kind="Service", name="web")],
    rules=[
        pb.Rule(
            **{"from": [pb.Source(request_principals=[f"{ISSUER}/*"])]},
            when=[pb.Condition(key="request.auth.claims[groups]", values=["admin"])],
        )
    ],
)


async def test_data_path_401_403_and_200_with_claim_headers() -> None:
    rule = {**RULE, "outputClaimToHeaders": [{"header": "x-jwt-groups", "claim": "groups"}]}
    dp, down, upstream = datapath([ADMINS_ONLY], [request_auth(rule)])

    async def send(headers: list[tuple[str, str]]) -> Response:
        return await dp.serve(down, Request("GET", "/orders", "web.shop", headers))

    anonymous = await send([])
    assert anonymous.status == 403  # no token: no principal, the ALLOW rule does not match
    expired = await send(bearer(token(exp=int(time.time()) - 600)))
    assert expired.status == 401
    assert await expired.body.read_all() == ra.EXPIRED.encode()
    assert expired.header("www-authenticate") == (
        'Bearer realm="http://web.shop/orders", error="invalid_token"'
    )
    staff = await send(bearer(token({"groups": ["staff"]})))
    assert staff.status == 403
    admin = await send(bearer(token({"groups": ["staff", "admin"]})))
    assert admin.status == 200
    seen = json.loads(await admin.body.read_all())
    assert seen["x-jwt-groups"] == "staff,admin"
    assert "authorization" not in seen
    assert len(upstream.requests) == 1


async def test_data_path_grpc_gets_unauthenticated_and_the_log_says_why() -> None:
    out = io.StringIO()
    dp, down, _ = datapath([], [request_auth(RULE)])
    dp.access_log = AccessLog(out)
    grpc = [("content-type", "application/grpc"), *bearer("not-a-jwt")]
    response = await dp.serve(down, Request("POST", "/demo.Echo/Say", "web.shop", grpc))
    assert response.status == 200
    assert response.header("grpc-status") == "16"
    assert response.header("grpc-message") == ra.BAD_FORMAT
    dp.access_log.flush()
    entry = json.loads(out.getvalue().split("meshway.access: ", 1)[1])
    assert entry["details"] == "jwt_authn_access_denied{" + ra.BAD_FORMAT.replace(" ", "_") + "}"


def test_an_inline_jwks_is_read_when_first_needed() -> None:
    """Every waypoint receives every RequestAuthentication: reading the keys (and loading
    PyJWT) waits until a token needs them, and a bad set is reported then."""
    from meshway.policy.requestauth import StaticKeys

    bad = StaticKeys("not json")
    assert bad._text is not None  # nothing read yet
    assert bad.current() is None and bad.error == "Jwks is an invalid JSON"
