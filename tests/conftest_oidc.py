"""A real OpenID provider for tests: tests/oidc/op.mjs (npm oidc-provider) run under Node, restartable."""

from __future__ import annotations

import json
import os
import selectors
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

OP_DIR = Path(__file__).parent / "oidc"
REALM = "konveyor"
AUDIENCE = "konveyor-api"
OPAQUE_RESOURCE = "urn:konveyor-opaque"  # tokens for it are opaque (checked by introspection)
INTROSPECTOR = "llm-proxy-introspect"  # the resource server's client, allowed to introspect
START_TIMEOUT = 30.0


def ensure_node_modules(directory: Path = OP_DIR, package: str = "oidc-provider") -> None:
    """`npm ci` in a test's Node.js directory (its lock file pins every package) unless `package` is there."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail(f"these tests need Node.js 20+ and npm on PATH ({directory.name} runs the npm package {package})")
    if (directory / "node_modules" / package / "package.json").is_file():
        return
    proc = subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=directory, capture_output=True, text=True, timeout=300, check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"npm ci in {directory} failed:\n{proc.stdout}\n{proc.stderr}")


class OpenIDProvider:
    """tests/oidc/op.mjs in a child process. `restart()` keeps the port (so the issuer) and rotates the keys."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.kids: dict[str, str] = {}
        self._log = tempfile.TemporaryFile()  # the provider's stderr, shown if it fails

    # ---- process -------------------------------------------------------------------------------

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["node", "op.mjs", "--port", str(self.port), "--realm", REALM],
            cwd=OP_DIR, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log,
        )
        ready = self._read_ready_line()
        self.port = int(ready["port"])
        self.kids = dict(ready["kids"])
        assert ready["issuer"] == self.issuer

    def _read_ready_line(self) -> dict[str, Any]:
        """Wait for the provider's one JSON 'ready' line on stdout (event-driven, bounded)."""
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        buf = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    self._fail("did not report ready in time")
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    self._fail("exited before it was ready")
                buf += chunk
        line = buf.split(b"\n", 1)[0]
        ready = json.loads(line)
        if ready.get("event") != "ready":
            self._fail(f"printed {line!r} instead of its ready line")
        return dict(ready)

    def _fail(self, what: str) -> None:
        self.stop()
        self._log.seek(0)
        pytest.fail(f"OpenID provider {what}; its stderr:\n{self._log.read().decode(errors='replace')}")

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None

    def restart(self) -> None:
        """Stop and start on the same port: same issuer, freshly generated signing keys."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        self._log.close()

    # ---- realm ---------------------------------------------------------------------------------

    def issuer_for(self, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}/realms/{REALM}"

    @property
    def issuer(self) -> str:
        return self.issuer_for()

    @property
    def jwks_uri(self) -> str:
        return f"{self.issuer}/protocol/openid-connect/certs"

    @property
    def token_endpoint(self) -> str:
        return f"{self.issuer}/protocol/openid-connect/token"

    @property
    def introspection_endpoint(self) -> str:
        return f"{self.token_endpoint}/introspect"

    def revoke(self, token: str, client: str = "llm-cli") -> None:
        """RFC 7009 revocation by the client the token was issued to."""
        form = {"token": token, "client_id": client, "client_secret": f"{client}-secret"}
        url = f"{self.issuer}/protocol/openid-connect/revoke"
        req = urllib.request.Request(url, data=urllib.parse.urlencode(form).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200

    def jwks(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.jwks_uri, timeout=10) as resp:
            return dict(json.loads(resp.read()))

    def token(
        self,
        client: str = "llm-cli",
        *,
        user: str | None = None,
        password: str | None = None,
        scope: str | None = None,
        host: str | None = None,
        resource: str | None = None,
    ) -> str:
        """An access token: client_credentials, or the password grant when `user` is given. `host` picks the
        issuer the way Keycloak's frontend URL does (e.g. "localhost" for the external route)."""
        form: dict[str, str] = {"client_id": client, "client_secret": f"{client}-secret"}
        if user is None:
            form["grant_type"] = "client_credentials"
        else:
            form.update(grant_type="password", username=user, password=password or f"{user}-password")
        if scope:
            form["scope"] = scope
        if resource:
            form["resource"] = resource
        req = urllib.request.Request(self.token_endpoint, data=urllib.parse.urlencode(form).encode(), method="POST")
        if host is not None:
            req.add_header("Host", f"{host}:{self.port}")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"token request failed: {exc.code} {exc.read().decode(errors='replace')}") from None
        return str(body["access_token"])


@pytest.fixture(scope="session")
def oidc_provider() -> Iterator[OpenIDProvider]:
    ensure_node_modules()
    op = OpenIDProvider()
    op.start()
    try:
        yield op
    finally:
        op.close()
