"""Register a safety net of this package as a runbook site on its dependency."""

from __future__ import annotations

from typing import Literal

from ..dependency import Dependency, Site
from ..observe import metrics


def register_site(
    dep: Dependency,
    name: str,
    mode: Literal["fail_soft", "fail_loud"],
    reason: str,
    fallback: str | None = None,
) -> Site:
    """The site ``name`` on ``dep``, created once (an app built twice shares it)."""
    for site in dep.sites:
        if site.name == name:
            return site
    site = Site(name=name, dependency=dep.name, mode=mode, reason=reason, fallback=fallback)
    site._counter = metrics.site_counter(site)
    dep.sites.append(site)
    return site
