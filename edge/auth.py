"""Optional JWT auth: which strategies a token may subscribe to."""

from __future__ import annotations

from dataclasses import dataclass

import jwt


class AuthError(Exception):
    """Missing or bad token: the connection is closed with 4001."""


@dataclass(frozen=True)
class Grant:
    subject: str | None
    strategies: frozenset[str] | None  # None: every strategy

    def allows(self, target: str) -> bool:
        return self.strategies is None or target in self.strategies


OPEN = Grant(subject=None, strategies=None)


class TokenVerifier:
    """HS256 with a shared secret or RS256 with a public key; `strategies` claim lists targets ('*' = all)."""

    def __init__(self, *, secret: str | None = None, public_key: str | None = None, audience: str | None = None):
        if public_key:
            self.key, self.algorithms = public_key, ["RS256"]
        elif secret:
            self.key, self.algorithms = secret, ["HS256"]
        else:
            raise ValueError("a secret or a public key is needed")
        self.audience = audience

    def verify(self, token: str | None) -> Grant:
        if not token:
            raise AuthError("missing token: pass ?token= or an Authorization: Bearer header")
        try:
            claims = jwt.decode(token, self.key, algorithms=self.algorithms, audience=self.audience,
                                options={"require": ["exp"]})
        except jwt.PyJWTError as exc:
            raise AuthError(f"bad token: {exc}") from None
        allowed = claims.get("strategies", [])
        if allowed == "*" or allowed == ["*"]:
            return Grant(claims.get("sub"), None)
        if not isinstance(allowed, list) or not all(isinstance(s, str) for s in allowed):
            raise AuthError("bad token: 'strategies' must be a list of names or '*'")
        return Grant(claims.get("sub"), frozenset(allowed))


def token_from(query: dict[str, str], authorization: str | None) -> str | None:
    if query.get("token"):
        return query["token"]
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None
