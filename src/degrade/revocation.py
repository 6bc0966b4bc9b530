"""A JWT revocation list (deny-list of ``jti``) in Redis with an explicit outage policy.

The seed runbook calls the usual behaviour a silent security failure: Redis goes
down, the revocation lookup errors or is skipped, and revoked tokens are
accepted again until they expire. Here what happens is a required decision,
``on_outage=``, written in code and listed in the generated runbook:

``"deny"``
    Treat every token as revoked while Redis is down (users must sign in again).
``"raise"``
    :class:`~degrade.DependencyUnavailable`: requests needing a token check answer 503.
``"allow"``
    FAIL-OPEN, chosen explicitly: accept tokens, except those whose revocation
    this process saw within the token lifetime (a bounded local set). A warning
    is logged at construction, and a security-tagged log line and Sentry event
    (tag ``degrade.security=revocation_fail_open``) at each transition into and
    out of failing open.

:meth:`RevocationList.revoke` is FAIL-LOUD whatever the policy: a logout that
cannot be recorded must not look like it was.

Saturation is not an outage: at the process's cap of abandoned calls (see
:mod:`degrade.modes`) a lookup or revoke is answered by the same policy without
calling Redis, counted as shed on its site (``shed_calls["abandoned-cap"]``),
never as a failure of the dependency. A lookup in flight when the dependency
goes down is answered by the policy at once. The local set's bound
(``max_local``) sheds no call: it only forgets the oldest local revocations.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Literal, get_args

from . import _binding, _validate
from .dependency import Dependency
from .exceptions import ConfigurationError
from .modes import fail_loud, fail_soft
from .observe import logger, security_event
from .redis import warn_problems

__all__ = ["OnOutage", "RevocationList"]

OnOutage = Literal["deny", "raise", "allow"]

#: The tag (key and value) on the Sentry events of a revocation list failing open.
SECURITY_TAG = ("degrade.security", "revocation_fail_open")


class RevocationList:
    """Revoked JWT ``jti`` values, in Redis, with a declared outage policy.

    Failure mode: declared by ``on_outage`` (no default; see the module
    docstring) for :meth:`is_revoked`; FAIL-LOUD for :meth:`revoke`. While
    ``dependency`` is down no Redis call is made. Only dependency errors
    (connection, timeout) trigger the policy: any other error (a wrong key type,
    an auth error) propagates, so the token is rejected, never accepted by accident.

    Args:
        client: A ``redis.asyncio.Redis`` (see :func:`degrade.redis.client`).
        dependency: The Redis dependency this list consults and feeds, or its
            name (``"redis"``): bound at the first call to the app's dependency
            of that name, as ``@fail_soft("redis", ...)`` is.
        on_outage: ``"deny"``, ``"raise"`` or ``"allow"``; required.
        token_ttl: Lifetime of your access tokens in seconds: how long a
            revocation is kept when :meth:`revoke` is not told the token's
            remaining lifetime.
        prefix: Prepended to every ``jti`` to form the Redis key.
        timeout: Hard bound of each Redis call, in seconds (``None``: only the
            client's own socket timeout).
        max_local: Most revocations remembered in-process (for ``"allow"``,
            and as a cheap early answer in every mode); the oldest is evicted
            beyond it and counted in ``evicted``.
        name: Shown in the runbook, logs and Sentry events.
        clock: Monotonic clock (tests inject a fake one).
    """

    def __init__(
        self,
        client: Any,
        dependency: Dependency | str,
        *,
        on_outage: OnOutage,
        token_ttl: float = 900.0,
        prefix: str = "degrade:revoked:",
        timeout: float | None = 0.25,
        max_local: int = 100_000,
        name: str = "revocations",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if on_outage not in get_args(OnOutage):
            raise ConfigurationError(
                f"on_outage must be 'deny' (treat tokens as revoked), 'raise' (503) or "
                f"'allow' (fail open, accepting revoked tokens); got {on_outage!r}"
            )
        if not (isinstance(dependency, Dependency) or (isinstance(dependency, str) and dependency.strip())):
            raise ConfigurationError(
                "dependency must be a Dependency (from registry.dependency()) or its name "
                f"(e.g. 'redis'); got {dependency!r}"
            )
        _validate.seconds("token_ttl", token_ttl)
        _validate.count("max_local", max_local)
        warn_problems(client, component=f"RevocationList[{name}]")
        self.client = client
        self._dependency = dependency
        self._dependency_name = dependency if isinstance(dependency, str) else dependency.name
        self.on_outage: OnOutage = on_outage
        self.token_ttl = float(token_ttl)
        self.prefix = prefix
        self.max_local = max_local
        self.name = name
        self._clock = clock
        self._local: OrderedDict[str, float] = OrderedDict()
        #: Revocations dropped from the local set because it was full.
        self.evicted = 0
        #: Tokens accepted without a Redis answer (policy "allow").
        self.accepted_unverified = 0
        self._failing_open_since: float | None = None
        self._warned_evict = False

        async def store(jti: str, ttl_ms: int) -> None:
            await client.set(prefix + jti, b"1", px=ttl_ms)

        async def lookup(jti: str) -> bool:
            found = bool(await client.exists(prefix + jti))
            if self._failing_open_since is not None:
                self._fail_open_ended()
            return found

        _name(store, f"RevocationList[{name}].revoke")
        _name(lookup, f"RevocationList[{name}].is_revoked")
        self._store = fail_loud(
            dependency,
            timeout=timeout,
            reason="revoking a token (logout) answers 503 while Redis is down; nothing is lost silently",
        )(store)
        self._lookup: Callable[[str], Any]
        if on_outage == "raise":
            self._lookup = fail_loud(
                dependency,
                timeout=timeout,
                reason="token revocation cannot be checked: authenticated requests answer 503",
            )(lookup)
        elif on_outage == "deny":

            def treat_as_revoked(jti: str) -> bool:
                return True

            _name(treat_as_revoked, "RevocationList.treat_as_revoked")
            self._lookup = fail_soft(
                dependency,
                fallback=treat_as_revoked,
                timeout=timeout,
                reason="every token is treated as revoked: users must sign in again",
            )(lookup)
        else:

            def accept(jti: str) -> bool:
                self._fail_open()
                return False

            _name(accept, "RevocationList.accept_unverified")
            self._lookup = fail_soft(
                dependency,
                fallback=accept,
                timeout=timeout,
                reason=(
                    "SECURITY, fail-open: revoked tokens are accepted until they expire, except "
                    "revocations this process saw; a security-tagged Sentry event marks each transition"
                ),
            )(lookup)
            logger.warning(
                "revocation.fail_open_configured",
                revocation_list=name,
                dependency=self._dependency_name,
                security=SECURITY_TAG[1],
                detail="while Redis is down, revoked tokens are accepted until they expire",
            )

    # -- public API ----------------------------------------------------------

    @property
    def dependency(self) -> Dependency:
        """The Redis dependency; given by name, the one a call would use now (see :mod:`degrade._binding`)."""
        dep = self._dependency
        if isinstance(dep, Dependency):
            return dep
        where = f"RevocationList[{self.name}]"
        return _binding.dependency_in(_binding.resolve(dep, where), dep, where)

    async def revoke(self, jti: str, *, ttl: float | None = None) -> None:
        """Revoke ``jti`` for ``ttl`` seconds (the token's remaining lifetime; default ``token_ttl``).

        The revocation is remembered in this process first, so this process
        rejects the token even if Redis cannot be written.

        Failure mode: FAIL-LOUD. Redis down or failing: raises
        :class:`~degrade.DependencyUnavailable` (503), so the caller knows the
        logout was not recorded for the other processes.
        """
        _check_jti(jti)
        seconds = self.token_ttl if ttl is None else _validate.seconds("ttl", ttl)
        self._remember(jti, seconds)
        await self._store(jti, max(1, round(seconds * 1000)))

    async def is_revoked(self, jti: str) -> bool:
        """True if ``jti`` was revoked (and its revocation has not expired).

        Failure mode: per ``on_outage`` while Redis is down or failing:
        ``"deny"`` returns True, ``"raise"`` raises
        :class:`~degrade.DependencyUnavailable`, ``"allow"`` returns False unless
        this process saw the revocation. Other errors propagate unchanged.
        """
        _check_jti(jti)
        if self._seen(jti):
            return True
        return bool(await self._lookup(jti))

    @property
    def failing_open(self) -> bool:
        """True while policy ``"allow"`` is accepting tokens without Redis."""
        return self._failing_open_since is not None

    @property
    def local_size(self) -> int:
        """Revocations currently remembered in this process."""
        return len(self._local)

    # -- the local set -------------------------------------------------------

    def _remember(self, jti: str, seconds: float) -> None:
        now = self._clock()
        self._prune(now)
        self._local.pop(jti, None)
        self._local[jti] = now + seconds
        while len(self._local) > self.max_local:
            self._local.popitem(last=False)
            self.evicted += 1
            if not self._warned_evict:
                self._warned_evict = True
                logger.warning(
                    "revocation.local_evicted",
                    revocation_list=self.name,
                    max_local=self.max_local,
                    security=SECURITY_TAG[1],
                    detail="oldest local revocations dropped; see RevocationList.evicted",
                )

    def _prune(self, now: float) -> None:
        # Entries are mostly in expiry order (one token lifetime); drop expired ones from the front.
        local = self._local
        while local:
            jti, expires = next(iter(local.items()))
            if expires > now:
                return
            del local[jti]

    def _seen(self, jti: str) -> bool:
        expires = self._local.get(jti)
        if expires is None:
            return False
        if expires > self._clock():
            return True
        del self._local[jti]
        return False

    # -- fail-open transitions -----------------------------------------------

    def _fail_open(self) -> None:
        self.accepted_unverified += 1
        if self._failing_open_since is not None:
            return
        self._failing_open_since = self._clock()
        security_event(
            "revocation.fail_open",
            kind=SECURITY_TAG[1],
            dependency=self._dependency_name,
            transition="started",
            message=f"degrade: revocation list {self.name} is failing open",
            fingerprint=["degrade", "revocation", self.name, "fail_open", "started"],
            sentry_level="error",
            extras={"revocation_list": self.name, "local_revocations": len(self._local)},
            revocation_list=self.name,
            detail="revoked tokens are being accepted (policy on_outage='allow')",
        )

    def _fail_open_ended(self) -> None:
        since, self._failing_open_since = self._failing_open_since, None
        duration = round(self._clock() - since, 3) if since is not None else None
        security_event(
            "revocation.fail_open",
            kind=SECURITY_TAG[1],
            dependency=self._dependency_name,
            transition="ended",
            message=f"degrade: revocation list {self.name} stopped failing open",
            fingerprint=["degrade", "revocation", self.name, "fail_open", "ended"],
            extras={"duration_s": duration, "accepted_unverified": self.accepted_unverified},
            revocation_list=self.name,
            duration_s=duration,
            accepted_unverified=self.accepted_unverified,
        )

    def __repr__(self) -> str:
        policy, dependency = self.on_outage, self._dependency_name
        return f"<RevocationList {self.name!r} on_outage={policy!r} dependency={dependency!r}>"


def _check_jti(jti: str) -> None:
    if not isinstance(jti, str) or not jti:
        raise ConfigurationError(f"jti must be a non-empty str; got {type(jti).__name__}")


def _name(fn: Callable[..., Any], qualname: str) -> None:
    fn.__qualname__ = qualname
    fn.__name__ = qualname.rsplit(".", 1)[-1]
