"""JWT request authentication at the waypoint, end to end: a RequestAuthentication whose JWK set
is served by a pod inside the mesh (Python's standard-library HTTP server, reached by its
Service name from the waypoint's pod), an AuthorizationPolicy that requires a request principal
and a claim, and real requests with tokens minted here.

One cluster for the module. Each test applies what it needs and removes it afterwards.
"""

from __future__ import annotations

import json
import os
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from .meshcluster import Cluster, running_cluster
from .waypointkit import (
    APP,
    PY,
    access_log,
    apply_temporarily,
    curl,
    http_service,
    logged,
    shop_with_waypoint,
    waypoint_log,
    workload,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)"),
]

ISSUER = "https://issuer.meshway.test"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
UNKNOWN_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
WEB = "http://web.shop.svc.cluster.local"
JWKS_URI = "http://issuer.shop.svc.cluster.local/jwks.json"


def manifest(jwks_dir: Path) -> str:
    return (
        shop_with_waypoint("client", "web", "issuer")
        + http_service("web", "app: web")
        + http_service("issuer", "app: issuer")
        + workload("client-0", "node-1", ["sleep", "infinity"])
        + workload("web-0", "node-2", [PY, APP, "http", "8080", "web-0"])
        # The JWK set's server: an unmodified standard-library HTTP server in a mesh pod.
        + workload(
            "issuer-0",
            "node-1",
            [PY, "-m", "http.server", "8080", "--bind", "0.0.0.0", "--directory", str(jwks_dir)],
        )
    )


def token(
    claims: dict[str, Any] | None = None, key: Any = KEY, kid: str = "k1", **extra: Any
) -> str:
    now = int(time.time())
    payload = {"iss": ISSUER, "sub": "alice", "iat": now, "exp": now + 600, **(claims or {})}
    payload.update(extra)
    return jwt.encode(payload, key, algorithm="RS256", headers={"kid": kid})


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    jwks_dir = tmp_path_factory.mktemp("jwks")
    public = RSAAlgorithm.to_jwk(KEY.public_key(), as_dict=True)
    (jwks_dir / "jwks.json").write_text(json.dumps({"keys": [{**public, "kid": "k1"}]}))
    jwks_dir.chmod(0o755)
    state = tmp_path_factory.mktemp("jwt")
    with running_cluster(state, manifest(jwks_dir)) as cluster:
        cluster.eventually(lambda: "serving HBONE" in waypoint_log(cluster), seconds=40)
        cluster.eventually(lambda: curl(cluster, f"{WEB}/").get("code") == 200, seconds=30)
        cluster.eventually(lambda: curl(cluster, JWKS_URI).get("code") == 200, seconds=30)
        yield cluster


def request_authentication(rule: str) -> str:
    return textwrap.dedent("""\
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata: {name: web-jwt, namespace: shop}
        spec:
          targetRefs: [{kind: Service, group: "", name: web}]
          jwtRules:
          - issuer: "%s"
            jwksUri: "%s"
        """) % (ISSUER, JWKS_URI) + textwrap.indent(textwrap.dedent(rule), "    ")


ADMINS_ONLY = textwrap.dedent(f"""\
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {{name: web-admins, namespace: shop}}
    spec:
      targetRefs: [{{kind: Service, group: "", name: web}}]
      action: ALLOW
      rules:
      - from: [{{source: {{requestPrincipals: ["{ISSUER}/*"]}}}}]
        when: [{{key: "request.auth.claims[groups]", values: [admin]}}]
    """)


def bearer(value: str) -> tuple[str, str]:
    return ("-H", f"Authorization: Bearer {value}")


def test_jwt_accept_reject_and_claim_based_authorization(mesh: Cluster) -> None:
    authn = request_authentication("""\
        outputClaimToHeaders:
        - {header: x-jwt-sub, claim: sub}
        - {header: x-jwt-groups, claim: groups}
        """)
    before = len(access_log(mesh))
    with apply_temporarily(mesh, authn + "---\n" + ADMINS_ONLY):
        admin = curl(mesh, f"{WEB}/admin", *bearer(token({"groups": ["staff", "admin"]})))
        no_token = curl(mesh, f"{WEB}/anonymous")
        expired = curl(mesh, f"{WEB}/expired", *bearer(token(exp=int(time.time()) - 600)))
        unknown_kid = curl(mesh, f"{WEB}/kid", *bearer(token(kid="k9")))
        forged = curl(mesh, f"{WEB}/forged", *bearer(token(key=UNKNOWN_KEY)))
        garbage = curl(mesh, f"{WEB}/garbage", *bearer("garbage"))
        staff = curl(mesh, f"{WEB}/staff", *bearer(token({"groups": ["staff"]})))
        in_query = curl(mesh, f"{WEB}/query?access_token={token({'groups': ['admin']})}")
    assert admin["code"] == 200, admin
    seen = json.loads(admin["body"])["headers"]
    assert seen["x-jwt-sub"] == "alice" and seen["x-jwt-groups"] == "staff,admin"
    assert "authorization" not in seen  # forwardOriginalToken is false
    assert in_query["code"] == 200, in_query

    assert (no_token["code"], no_token["body"]) == (403, "RBAC: access denied")
    assert (staff["code"], staff["body"]) == (403, "RBAC: access denied")
    for reply, text in (
        (expired, "Jwt is expired"),
        (unknown_kid, "Jwks doesn't have key to match kid or alg from Jwt"),
        (forged, "Jwt verification fails"),
        (
            garbage,
            "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections",
        ),
    ):
        assert (reply["code"], reply["body"]) == (401, text), reply
        assert reply["headers"]["www-authenticate"].startswith(
            'Bearer realm="http://web.shop.svc.cluster.local/'
        )
        assert reply["headers"]["www-authenticate"].endswith('error="invalid_token"')

    entry = logged(mesh, lambda e: e.get("path") == "/expired", before)
    assert entry["response_code"] == 401
    assert entry["details"] == "jwt_authn_access_denied{Jwt_is_expired}"
    assert entry.get("upstream_host") is None  # refused before any backend was picked
    denied = logged(mesh, lambda e: e.get("path") == "/staff", before)
    assert denied["response_code"] == 403 and denied["details"].startswith("rbac_access_denied")
    # The keys came from the pod inside the mesh, fetched by the waypoint from its own pod.
    waypoint_ip = mesh.status()["pods"]["shop/waypoint"]["ip"]
    fetches = [
        line
        for line in mesh.meshway("logs", "shop/issuer-0").stdout.splitlines()
        if "GET /jwks.json" in line
    ]
    assert any(line.startswith(f"{waypoint_ip} ") for line in fetches), fetches


def test_forward_original_token_from_a_custom_header(mesh: Cluster) -> None:
    authn = request_authentication("""\
        fromHeaders: [{name: x-token}]
        forwardOriginalToken: true
        outputClaimToHeaders: [{header: x-jwt-sub, claim: sub}]
        """)
    good = token()
    with apply_temporarily(mesh, authn):
        forwarded = curl(mesh, f"{WEB}/fwd", "-H", f"x-token: {good}")
        bad = curl(mesh, f"{WEB}/bad", "-H", f"x-token: {token(exp=int(time.time()) - 600)}")
        anonymous = curl(mesh, f"{WEB}/anon", "-H", "x-jwt-sub: root")
        # Authorization is not a location of this rule: its token is not looked at.
        elsewhere = curl(mesh, f"{WEB}/elsewhere", *bearer("garbage"))
    assert forwarded["code"] == 200, forwarded
    assert json.loads(forwarded["body"])["headers"]["x-token"] == good
    assert (bad["code"], bad["body"]) == (401, "Jwt is expired")
    assert anonymous["code"] == 200  # no AuthorizationPolicy: no token is fine
    assert "x-jwt-sub" not in json.loads(anonymous["body"])["headers"]  # not passed off as a claim
    assert json.loads(forwarded["body"])["headers"]["x-jwt-sub"] == "alice"
    assert elsewhere["code"] == 200
    assert json.loads(elsewhere["body"])["headers"]["authorization"] == "Bearer garbage"
