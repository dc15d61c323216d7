"""The CLI's connection to a control plane's admin API."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx

DEFAULT_SERVER = "http://127.0.0.1:15014"


def default_state_dir() -> Path:
    env = os.environ.get("MESHWAY_STATE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "meshway"


class ApiError(Exception):
    """The control plane answered with an error; `body` is its JSON answer."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body.get("error", f"HTTP {status}"))
        self.status = status
        self.body = body


class Unreachable(Exception):
    pass


def _context() -> dict[str, str]:
    """The control plane of the cluster `meshway cluster up` started last, if any."""
    try:
        data: dict[str, str] = json.loads((default_state_dir() / "context.json").read_text())
    except (OSError, ValueError):
        return {}
    return data


class ControlPlaneClient:
    """Finds its control plane from flags, then MESHWAY_SERVER/MESHWAY_TOKEN, then the current
    local cluster, then the default state directory."""

    def __init__(self, server: str | None = None, token: str | None = None) -> None:
        context = {} if (server or os.environ.get("MESHWAY_SERVER")) else _context()
        self.server = (
            server or os.environ.get("MESHWAY_SERVER") or context.get("server") or DEFAULT_SERVER
        ).rstrip("/")
        self.token = (
            token
            or os.environ.get("MESHWAY_TOKEN")
            or self._read_token(context.get("tokenFile"))
            or self._token_from_state()
        )
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._http = httpx.Client(base_url=self.server, headers=headers, timeout=60.0)

    @staticmethod
    def _read_token(path: str | None) -> str | None:
        if not path:
            return None
        try:
            return Path(path).read_text().strip()
        except OSError:
            return None

    @staticmethod
    def _token_from_state() -> str | None:
        path = default_state_dir() / "admin.token"
        try:
            return path.read_text().strip()
        except OSError:
            return None

    def request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise Unreachable(
                f"cannot reach the control plane at {self.server} ({exc}); is "
                "`meshway controlplane` running? (set --server or MESHWAY_SERVER)"
            ) from exc
        try:
            body: dict[str, Any] = response.json()
        except ValueError:
            body = {"error": response.text.strip() or f"HTTP {response.status_code}"}
        if response.status_code >= 400:
            raise ApiError(response.status_code, body)
        return body

    def apply(self, sources: list[tuple[str, str]], dry_run: bool = False) -> dict[str, Any]:
        payload = {"sources": [{"name": n, "text": t} for n, t in sources]}
        params = {"dryRun": "true"} if dry_run else {}
        return self.request("POST", "/api/v1/apply", json=payload, params=params)

    def delete_sources(self, sources: list[tuple[str, str]]) -> dict[str, Any]:
        payload = {"sources": [{"name": n, "text": t} for n, t in sources]}
        return self.request("POST", "/api/v1/delete", json=payload)

    def delete_keys(self, keys: list[dict[str, str]]) -> dict[str, Any]:
        return self.request("POST", "/api/v1/delete", json={"keys": keys})

    def list(
        self, kind: str | None = None, namespace: str | None = None, name: str | None = None
    ) -> dict[str, Any]:
        params = {k: v for k, v in (("kind", kind), ("namespace", namespace), ("name", name)) if v}
        return self.request("GET", "/api/v1/objects", params=params)

    def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """One object, or None if there is none of that name."""
        try:
            items = self.list(kind, namespace, name)["items"]
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        return items[0] if items else None

    def endpoints(self, namespace: str | None = None, name: str | None = None) -> dict[str, Any]:
        params = {k: v for k, v in (("namespace", namespace), ("name", name)) if v}
        return self.request("GET", "/api/v1/endpoints", params=params)

    def proxies(self) -> dict[str, Any]:
        return self.request("GET", "/api/v1/proxies")

    def join(self, node: str) -> dict[str, Any]:
        return self.request("POST", f"/api/v1/nodes/{node}/join")

    def version(self) -> dict[str, Any]:
        return self.request("GET", "/version")
