"""JWT request authentication at the waypoint: RequestAuthentications attached with `targetRefs`.

Semantics follow Istio's RequestAuthentication as Envoy's `jwt_authn` filter enforces it (Istio
configures every provider with `allow_missing`):

- Which policies: the same attachment as the waypoint's AuthorizationPolicies (`targetRefs` to
  the request's Service, the waypoint's Gateway, or from the root namespace the GatewayClass
  `istio-waypoint`). A `selector` RequestAuthentication is for sidecars and is not delivered to
  waypoints; nothing enforces it at a waypoint.
- No token in any of the rules' locations: the request goes on with no request principal (an
  AuthorizationPolicy can require one). A token that is there but invalid: 401 with Envoy's
  text (`Jwt is expired`, `Jwt verification fails`, ...) and `www-authenticate: Bearer
  realm="<url>", error="invalid_token"`; a valid token whose audiences are not allowed gets 403
  `Audiences in Jwt are not allowed`, as Envoy answers. If several tokens are present, one that
  verifies is enough.
- Locations: `fromHeaders` (with `prefix`), `fromParams`, `fromCookies`; with none of them,
  `Authorization: Bearer <token>` and the `access_token` query parameter.
- Checks, in Envoy's order: the token's form (three base64url parts of JSON, a supported `alg`:
  never `none`), its issuer (a rule whose `issuer` is the token's `iss`; a rule without one
  takes any), `exp`/`nbf` with Envoy's 60 s clock skew, the audiences (any of the token's `aud`
  in the rule's `audiences`, scheme and final slash ignored; an empty list checks none, which
  is what Istio configures although its reference mentions the service name), then the
  signature with a key of the rule's JWK set whose `kid`, `kty`/`crv` and `alg` fit the token
  (an HMAC token never matches a public key). A rule with neither `jwks` nor `jwksUri` finds
  its set by OpenID discovery (`<issuer>/.well-known/openid-configuration`), as istiod does.
- After success: the request principal is `<iss>/<sub>`; `outputClaimToHeaders` sets headers
  from claims (nested claims with `a.b`, lists joined with `,`), `outputPayloadToHeader` the
  base64url payload; unless `forwardOriginalToken`, the header that carried the token is
  removed before forwarding (a parameter or cookie stays, as in Envoy). A request without a
  token loses the headers the rules output (a deliberate difference from Istio, which passes a
  client's own `x-jwt-sub` on), so that a backend can trust them.

Signatures are checked with PyJWT's algorithms (on `cryptography`); parsing is done here so
that each failure gets Envoy's own message.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from http.cookies import CookieError, SimpleCookie
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qsl

from meshway.api.v1 import authorization_pb2
from meshway.config.model import JwtRule, RequestAuthentication, duration_seconds
from meshway.policy.authorization import DEFAULT_ROOT_NAMESPACE
from meshway.policy.waypoint import _targets

if TYPE_CHECKING:
    from jwt.algorithms import Algorithm

log = logging.getLogger(__name__)

CLOCK_SKEW = 60.0  # Envoy's default clock_skew_seconds
DEFAULT_HEADER = ("authorization", "Bearer ")
DEFAULT_PARAM = "access_token"
REALM_PATH_LIMIT = 256  # Envoy's MaximumUriLength for the realm
DEFAULT_JWKS_TIMEOUT = 5.0  # Istio's JWTRule.timeout default
OPENID_CONFIGURATION = "/.well-known/openid-configuration"

# Envoy's texts (jwt_verify_lib status strings) for the failures the waypoint reports.
BAD_FORMAT = "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
HEADER_BAD_BASE64 = "Jwt header is an invalid Base64url encoded"
HEADER_BAD_JSON = "Jwt header is an invalid JSON"
HEADER_BAD_ALG = "Jwt header [alg] field is required and must be a string"
HEADER_ALG_NOT_SUPPORTED = "Jwt header [alg] is not supported"
HEADER_BAD_KID = "Jwt header [kid] field is not a string"
PAYLOAD_BAD_BASE64 = "Jwt payload is an invalid Base64url encoded"
PAYLOAD_BAD_JSON = "Jwt payload is an invalid JSON"
SIGNATURE_BAD_BASE64 = "Jwt signature is an invalid Base64url encoded"
NOT_YET_VALID = "Jwt not yet valid"
EXPIRED = "Jwt is expired"
UNKNOWN_ISSUER = "Jwt issuer is not configured"
AUDIENCE_NOT_ALLOWED = "Audiences in Jwt are not allowed"
VERIFICATION_FAILS = "Jwt verification fails"
KID_ALG_MISMATCH = "Jwks doesn't have key to match kid or alg from Jwt"
JWKS_FETCH_FAILED = "Jwks remote fetch is failed"
JWKS_BAD_JSON = "Jwks is an invalid JSON"
JWKS_NO_KEYS = "Jwks does not have [keys] field"
JWKS_BAD_KEYS = "[keys] in Jwks is not an array"
JWKS_NO_VALID_KEYS = "Jwks doesn't have any valid public key"

# The algorithms Envoy verifies, with the key type (and curve) each needs.
_ALGORITHMS: dict[str, tuple[str, str | None]] = {
    **{f"RS{n}": ("RSA", None) for n in (256, 384, 512)},
    **{f"PS{n}": ("RSA", None) for n in (256, 384, 512)},
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", None),
    **{f"HS{n}": ("oct", None) for n in (256, 384, 512)},
}


@cache
def _verifiers() -> dict[str, Algorithm]:
    """PyJWT's algorithms, imported when the first key set is read: a waypoint without a
    RequestAuthentication does not carry PyJWT."""
    import jwt

    return {name: jwt.get_algorithm_by_name(name) for name in _ALGORITHMS}


class JwtError(Exception):
    """A token that is present but not acceptable; the message is Envoy's text."""

    def __init__(self, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class JwksError(ValueError):
    """A JWK set that cannot be used; the message is Envoy's text."""


# -- keys --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JwtKey:
    """One public (or HMAC) key of a JWK set, ready for verification."""

    kid: str | None
    kty: str
    crv: str | None
    alg: str | None
    key: Any

    def fits(self, alg: str, kid: str | None) -> bool:
        if kid is not None and self.kid is not None and kid != self.kid:
            return False
        if self.alg is not None and self.alg != alg:
            return False
        kty, crv = _ALGORITHMS[alg]
        return self.kty == kty and (crv is None or self.crv == crv)


def parse_jwks(text: str | bytes) -> tuple[JwtKey, ...]:
    """The usable keys of a JWK set; keys PyJWT cannot load are skipped (as Envoy skips
    keys it cannot parse), and a set with none left is an error."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise JwksError(JWKS_BAD_JSON) from exc
    if not isinstance(data, dict) or "keys" not in data:
        raise JwksError(JWKS_NO_KEYS)
    if not isinstance(data["keys"], list):
        raise JwksError(JWKS_BAD_KEYS)
    import jwt

    keys: list[JwtKey] = []
    for entry in data["keys"]:
        if not isinstance(entry, dict):
            continue
        try:
            loaded = jwt.PyJWK(entry).key
        except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
            log.debug("JWK %s skipped: %s", entry.get("kid"), exc)
            continue
        if hasattr(loaded, "public_key") and callable(loaded.public_key):
            loaded = loaded.public_key()  # a private key in a JWK set verifies as its public key
        kid, alg, crv = entry.get("kid"), entry.get("alg"), entry.get("crv")
        keys.append(
            JwtKey(
                kid if isinstance(kid, str) else None,
                str(entry.get("kty")),
                crv if isinstance(crv, str) else None,
                alg if isinstance(alg, str) else None,
                loaded,
            )
        )
    if not keys:
        raise JwksError(JWKS_NO_VALID_KEYS)
    return tuple(keys)


class KeySource(Protocol):
    """Where a rule's keys come from: inline, or fetched and refreshed (`waypoint/jwks.py`)."""

    def current(self) -> tuple[JwtKey, ...] | None:
        """The keys now, or None when there are none (yet)."""

    async def wait(self) -> tuple[JwtKey, ...] | None:
        """The keys once the first load has ended (at most the rule's timeout)."""


class StaticKeys:
    """An inline `jwks`, read when a token first needs it: every waypoint receives every
    RequestAuthentication, and one that serves none of its targets never loads PyJWT."""

    def __init__(self, text: str) -> None:
        self._text: str | None = text
        self._keys: tuple[JwtKey, ...] | None = None
        self._error: str | None = None

    def _parse(self) -> None:
        text, self._text = self._text, None
        if text is not None:
            try:
                self._keys = parse_jwks(text)
            except JwksError as exc:
                self._error = str(exc)

    @property
    def keys(self) -> tuple[JwtKey, ...] | None:
        self._parse()
        return self._keys

    @property
    def error(self) -> str | None:
        self._parse()
        return self._error

    def current(self) -> tuple[JwtKey, ...] | None:
        return self.keys

    async def wait(self) -> tuple[JwtKey, ...] | None:
        return self.keys


class KeySources(Protocol):
    """Gives the key source of a `jwksUri` (file or HTTP(S)) with the rule's timeout; with
    `discovery`, `uri` is an OpenID configuration whose `jwks_uri` names the set."""

    def source(self, uri: str, timeout: float, discovery: bool = False) -> KeySource: ...


class _NoKeySources:
    """For an index built without a fetcher: a `jwksUri` then has no keys (401)."""

    def source(self, uri: str, timeout: float, discovery: bool = False) -> KeySource:
        return _NO_KEYS


_NO_SOURCES = _NoKeySources()


class _NoKeys:
    """A rule whose keys cannot be had (no fetcher, or no URL to discover them from)."""

    def current(self) -> tuple[JwtKey, ...] | None:
        return None

    async def wait(self) -> tuple[JwtKey, ...] | None:
        return None


_NO_KEYS = _NoKeys()


# -- tokens ------------------------------------------------------------------------------------


_BASE64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")


def _b64decode(part: str) -> bytes:
    """Strict base64url (the standard library would skip characters outside the alphabet)."""
    if not _BASE64URL.fullmatch(part):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(part.rstrip("=") + "=" * (-len(part.rstrip("=")) % 4))


@dataclass(frozen=True, slots=True)
class ParsedJwt:
    token: str
    header: Mapping[str, Any]
    payload: Mapping[str, Any]
    signing_input: bytes
    signature: bytes

    @property
    def alg(self) -> str:
        return str(self.header["alg"])

    @property
    def kid(self) -> str | None:
        kid = self.header.get("kid")
        return kid if isinstance(kid, str) else None


def _json_part(part: str, bad_base64: str, bad_json: str) -> dict[str, Any]:
    """A token's header or payload: base64url of a JSON object, else JwtError(the text)."""
    try:
        data = _b64decode(part)
    except (binascii.Error, ValueError) as exc:
        raise JwtError(bad_base64) from exc
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise JwtError(bad_json) from exc
    if not isinstance(value, dict):
        raise JwtError(bad_json)
    return value


def parse_jwt(token: str) -> ParsedJwt:
    """The token's parts, or JwtError with Envoy's text for what is wrong with its form."""
    parts = token.split(".")
    if len(parts) != 3:
        raise JwtError(BAD_FORMAT)
    header = _json_part(parts[0], HEADER_BAD_BASE64, HEADER_BAD_JSON)
    alg = header.get("alg")
    if not isinstance(alg, str):
        raise JwtError(HEADER_BAD_ALG)
    if alg not in _ALGORITHMS:
        raise JwtError(HEADER_ALG_NOT_SUPPORTED)  # "none" among them
    if "kid" in header and not isinstance(header["kid"], str):
        raise JwtError(HEADER_BAD_KID)
    payload = _json_part(parts[1], PAYLOAD_BAD_BASE64, PAYLOAD_BAD_JSON)
    for name in ("iss", "sub", "jti"):
        if name in payload and not isinstance(payload[name], str):
            raise JwtError(f"Jwt payload [{name}] field is not a string")
    for name in ("iat", "nbf", "exp"):
        value = payload.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise JwtError(f"Jwt payload [{name}] field is not an integer")
    aud = payload.get("aud")
    if aud is not None and not (
        isinstance(aud, str) or (isinstance(aud, list) and all(isinstance(a, str) for a in aud))
    ):
        raise JwtError("Jwt payload [aud] field is not a string or string list")
    try:
        signature = _b64decode(parts[2])
    except (binascii.Error, ValueError) as exc:
        raise JwtError(SIGNATURE_BAD_BASE64) from exc
    return ParsedJwt(
        token, header, payload, f"{parts[0]}.{parts[1]}".encode("ascii", "replace"), signature
    )


def _audience(value: str) -> str:
    """Envoy compares audiences without scheme and final slash."""
    for scheme in ("http://", "https://"):
        if value.startswith(scheme):
            value = value[len(scheme) :]
            break
    return value.rstrip("/")


def token_audiences(payload: Mapping[str, Any]) -> tuple[str, ...]:
    aud = payload.get("aud")
    if isinstance(aud, str):
        return (aud,)
    if isinstance(aud, list):
        return tuple(a for a in aud if isinstance(a, str))
    return ()


# -- rules -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CompiledJwtRule:
    """One `jwtRules` entry, ready for requests."""

    policy: str
    issuer: str | None
    audiences: frozenset[str]
    headers: tuple[tuple[str, str], ...]  # (lower-case name, prefix)
    params: tuple[str, ...]
    cookies: tuple[str, ...]
    claim_headers: tuple[tuple[str, str], ...]  # (header, claim)
    payload_header: str | None
    forward: bool
    keys: KeySource

    def check(self, parsed: ParsedJwt, now: float) -> None:
        """Time, audiences: the checks Envoy makes before it looks for a key."""
        payload = parsed.payload
        nbf = payload.get("nbf")
        if nbf is not None and now + CLOCK_SKEW < nbf:
            raise JwtError(NOT_YET_VALID)
        exp = payload.get("exp")
        if exp is not None and now - CLOCK_SKEW > exp:
            raise JwtError(EXPIRED)
        if self.audiences and not any(
            _audience(a) in self.audiences for a in token_audiences(payload)
        ):
            raise JwtError(AUDIENCE_NOT_ALLOWED, 403)

    def verify_signature(self, parsed: ParsedJwt, keys: Sequence[JwtKey] | None) -> None:
        if keys is None:
            # An inline set with no usable key says so; a URL or file that gave none yet:
            static_error = self.keys.error if isinstance(self.keys, StaticKeys) else None
            raise JwtError(static_error or JWKS_FETCH_FAILED)
        alg = parsed.alg
        fitting = [k for k in keys if k.fits(alg, parsed.kid)]
        if not fitting:
            raise JwtError(KID_ALG_MISMATCH)
        from jwt import PyJWTError

        verifier = _verifiers()[alg]
        for key in fitting:
            try:
                if verifier.verify(parsed.signing_input, key.key, parsed.signature):
                    return
            except (PyJWTError, ValueError, TypeError, AttributeError):
                continue  # a key of the right type that cannot verify this signature
        raise JwtError(VERIFICATION_FAILS)


def compile_rule(policy: str, rule: JwtRule, sources: KeySources) -> CompiledJwtRule:
    keys: KeySource
    timeout = duration_seconds(rule.timeout) if rule.timeout else DEFAULT_JWKS_TIMEOUT
    timeout = timeout if timeout > 0 else DEFAULT_JWKS_TIMEOUT
    if rule.jwks is not None:
        keys = StaticKeys(rule.jwks)
    elif rule.jwks_uri:
        keys = sources.source(rule.jwks_uri, timeout)
    elif rule.issuer and rule.issuer.startswith(("https://", "http://")):
        # OpenID discovery, as istiod does: the issuer's configuration names the JWK set.
        keys = sources.source(rule.issuer.rstrip("/") + OPENID_CONFIGURATION, timeout, True)
    else:
        keys = _NO_KEYS
    headers = tuple((h.name.lower(), h.prefix or "") for h in rule.from_headers)
    params = tuple(rule.from_params)
    cookies = tuple(rule.from_cookies)
    if not (headers or params or cookies):
        headers, params = (DEFAULT_HEADER,), (DEFAULT_PARAM,)
    return CompiledJwtRule(
        policy,
        rule.issuer or None,
        frozenset(_audience(a) for a in rule.audiences),
        headers,
        params,
        cookies,
        tuple((c.header.lower(), c.claim) for c in rule.output_claim_to_headers),
        rule.output_payload_to_header.lower() if rule.output_payload_to_header else None,
        rule.forward_original_token,
        keys,
    )


# -- requests ----------------------------------------------------------------------------------


class AuthRequest(Protocol):
    """What authentication reads and changes of a request (`waypoint.messages.Request`)."""

    method: str
    path: str
    authority: str
    headers: list[tuple[str, str]]
    scheme: str


@dataclass(frozen=True, slots=True)
class RequestAuth:
    """An authenticated request: Istio's `request.auth.*` attributes."""

    issuer: str
    subject: str
    claims: Mapping[str, Any]

    @property
    def principal(self) -> str:
        return f"{self.issuer}/{self.subject}"

    @property
    def audiences(self) -> tuple[str, ...]:
        return token_audiences(self.claims)

    @property
    def presenter(self) -> str | None:
        azp = self.claims.get("azp")
        return azp if isinstance(azp, str) else None

    def claim(self, path: Sequence[str]) -> list[str]:
        """The string values of a (nested) claim; a list claim gives its string elements."""
        value: Any = self.claims
        for name in path:
            if not isinstance(value, dict) or name not in value:
                return []
            value = value[name]
        if isinstance(value, str):
            return [value]
        if isinstance(value, list):
            return [v for v in value if isinstance(v, str)]
        if isinstance(value, bool):
            return ["true" if value else "false"]
        return []


@dataclass(frozen=True, slots=True)
class AuthnResult:
    """No token (`auth` None, `error` None), authenticated, or refused with Envoy's text."""

    auth: RequestAuth | None = None
    error: str | None = None
    status: int = 401

    @property
    def details(self) -> str:
        """Envoy's response code details for the access log."""
        return f"jwt_authn_access_denied{{{(self.error or '').replace(' ', '_')}}}"


NO_TOKEN = AuthnResult()


def www_authenticate(request: AuthRequest, error: bool = True) -> str:
    path = request.path[:REALM_PATH_LIMIT]
    value = f'Bearer realm="{request.scheme}://{request.authority}{path}"'
    return value + ', error="invalid_token"' if error else value


def _header_token(value: str, prefix: str) -> str | None:
    if prefix:
        at = value.lower().find(prefix.lower())
        if at < 0:
            return None
        value = value[at + len(prefix) :]
    token = value.strip().split(",", 1)[0].split(None, 1)
    return token[0] if token else None


@dataclass(slots=True)
class _Found:
    token: str
    rules: list[CompiledJwtRule] = field(default_factory=list)
    header: str | None = None  # the header that carried it


def _claim_header_value(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    if isinstance(value, list):
        items = [_claim_header_value(v) for v in value]
        return ",".join(i for i in items if i is not None)
    return None


class Authenticator:
    """The JWT rules that apply to one target (a Service, or the workloads of a namespace)."""

    def __init__(self, rules: Sequence[CompiledJwtRule]) -> None:
        self.rules = tuple(rules)
        # The headers the rules output: removed from requests without a verified token.
        self.output_headers = frozenset(
            name
            for rule in self.rules
            for name in (
                *(header for header, _ in rule.claim_headers),
                *((rule.payload_header,) if rule.payload_header else ()),
            )
        )

    def _tokens(self, request: AuthRequest) -> list[_Found]:
        found: dict[str, _Found] = {}
        query: list[tuple[str, str]] | None = None
        cookies: SimpleCookie | None = None
        headers = request.headers
        for rule in self.rules:
            for name, prefix in rule.headers:
                for key, value in headers:
                    if key == name and (token := _header_token(value, prefix)):
                        entry = found.setdefault(token, _Found(token))
                        entry.rules.append(rule)
                        entry.header = entry.header or name
                        break
            if rule.params and "?" in request.path:
                if query is None:
                    _, _, qs = request.path.partition("?")
                    query = parse_qsl(qs, keep_blank_values=False)
                for param in rule.params:
                    for key, value in query:
                        if key == param and value:
                            found.setdefault(value, _Found(value)).rules.append(rule)
                            break
            if rule.cookies:
                if cookies is None:
                    cookies = SimpleCookie()
                    for key, value in headers:
                        if key == "cookie":
                            try:
                                cookies.load(value)
                            except CookieError:
                                continue
                for name in rule.cookies:
                    morsel = cookies.get(name)
                    if morsel is not None and morsel.value:
                        found.setdefault(morsel.value, _Found(morsel.value)).rules.append(rule)
        return list(found.values())

    def tokens(self, request: AuthRequest) -> list[_Found]:
        """The request's tokens for these rules, found without awaiting (so that a request
        without one never starts `authenticate`). With none, the request passes with no
        request principal, and the claim headers are dropped from it here."""
        found = self._tokens(request)
        if not found and self.output_headers:
            # Istio passes them on; a backend could then not trust them without a policy.
            drop = self.output_headers
            headers = request.headers
            for name, _ in headers:  # rebuilt only when one is there: rarely
                if name in drop:
                    headers[:] = [(k, v) for k, v in headers if k not in drop]
                    break
        return found

    async def authenticate(
        self, request: AuthRequest, now: float, found: list[_Found] | None = None
    ) -> AuthnResult:
        """Check the request's tokens (`found`: what `tokens` gave, so that they are not looked
        for twice); on success, apply the winning rule's header outputs."""
        if found is None:
            found = self.tokens(request)
        if not found:
            return NO_TOKEN
        first_error: JwtError | None = None
        for entry in found:
            try:
                parsed = parse_jwt(entry.token)
                issuer = parsed.payload.get("iss")
                rules = [r for r in entry.rules if r.issuer is None or r.issuer == issuer]
                if not rules:
                    raise JwtError(UNKNOWN_ISSUER)
                rule = await self._verify(parsed, rules, now)
            except JwtError as exc:
                first_error = first_error or exc
                continue
            auth = RequestAuth(
                str(issuer or ""), str(parsed.payload.get("sub", "")), parsed.payload
            )
            self._output(request, rule, parsed, entry)
            return AuthnResult(auth)
        assert first_error is not None
        return AuthnResult(None, first_error.message, first_error.status)

    @staticmethod
    async def _verify(
        parsed: ParsedJwt, rules: Sequence[CompiledJwtRule], now: float
    ) -> CompiledJwtRule:
        error: JwtError | None = None
        for rule in rules:
            try:
                rule.check(parsed, now)
                keys = rule.keys.current()
                if keys is None:
                    keys = await rule.keys.wait()
                rule.verify_signature(parsed, keys)
                return rule
            except JwtError as exc:
                error = error or exc
        assert error is not None
        raise error

    @staticmethod
    def _output(
        request: AuthRequest, rule: CompiledJwtRule, parsed: ParsedJwt, entry: _Found
    ) -> None:
        outputs: list[tuple[str, str]] = []
        for header, claim in rule.claim_headers:
            value: Any = parsed.payload
            for name in claim.split("."):
                value = value.get(name) if isinstance(value, dict) else None
            text = _claim_header_value(value)
            if text is not None:
                outputs.append((header, text))
        if rule.payload_header is not None:
            encoded = parsed.token.split(".")[1]
            outputs.append((rule.payload_header, encoded))
        drop = {name for name, _ in outputs}
        if not rule.forward and entry.header is not None:
            drop.add(entry.header)
        if drop:
            request.headers[:] = [(k, v) for k, v in request.headers if k not in drop]
        request.headers.extend(outputs)


# -- attachment --------------------------------------------------------------------------------


def _target_refs(policy: RequestAuthentication) -> list[authorization_pb2.TargetRef]:
    ns = policy.metadata.namespace or ""
    refs = list(policy.spec.target_refs)
    if policy.spec.target_ref is not None:
        refs.append(policy.spec.target_ref)
    return [
        authorization_pb2.TargetRef(
            group=r.group or "", kind=r.kind, name=r.name, namespace=r.namespace or ns
        )
        for r in refs
    ]


class RequestAuthIndex:
    """The targetRefs RequestAuthentications of one snapshot, compiled once, grouped per
    target on first use. A target with none costs one dictionary lookup per request."""

    def __init__(
        self,
        policies: Iterable[RequestAuthentication],
        gateway: tuple[str, str],
        sources: KeySources | None = None,
        root_namespace: str = DEFAULT_ROOT_NAMESPACE,
    ) -> None:
        self.gateway = gateway
        self.root_namespace = root_namespace
        self._policies: list[tuple[str, list[authorization_pb2.TargetRef], list[CompiledJwtRule]]]
        self._policies = []
        for policy in sorted(policies, key=lambda p: (p.metadata.namespace or "", p.metadata.name)):
            refs = _target_refs(policy)
            if not refs:
                continue  # a selector policy: for sidecars, not for a waypoint
            name = f"{policy.metadata.namespace}/{policy.metadata.name}"
            rules = [compile_rule(name, r, sources or _NO_SOURCES) for r in policy.spec.jwt_rules]
            self._policies.append((policy.metadata.namespace or "", refs, rules))
        self._by_target: dict[tuple[str, str], Authenticator | None] = {}

    @property
    def empty(self) -> bool:
        return not self._policies

    def for_target(self, namespace: str, service: str) -> Authenticator | None:
        key = (namespace, service)
        try:
            return self._by_target[key]
        except KeyError:
            pass
        rules: list[CompiledJwtRule] = []
        for policy_ns, refs, compiled in self._policies:
            if any(
                _targets(ref, policy_ns, key, self.gateway, self.root_namespace) for ref in refs
            ):
                rules.extend(compiled)
        found = Authenticator(rules) if rules else None
        self._by_target[key] = found
        return found
