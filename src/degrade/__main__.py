"""``python -m degrade runbook|alerts module:attr``: the runbook and alert rules, from code.

``python -m degrade proxy --pair NAME=LISTEN,UPSTREAM``: fault proxies outside pytest,
switched over HTTP or stdin (see :mod:`degrade.testing._cli`).

``python -m degrade outbox-ddl [--table NAME]``: the SQL of a transactional outbox table.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog
from starlette.applications import Starlette

from .registry import Registry
from .runbook import render_alerts, render_runbook
from .testing import _cli as proxy_cli


class UsageError(Exception):
    """A bad argument: printed as one line, exit status 2."""


def load_registry(spec: str) -> Registry:
    """Import ``module:attr`` and return it if it is a Registry."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"expected module:attribute (e.g. examples.app:registry), got {spec!r}")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # like `python -m`, find modules in the current directory
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import module {module_name!r}: {exc}") from exc
    obj: object = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, Registry):
        raise UsageError(f"{spec} is a {type(obj).__name__}, not a degrade.Registry")
    build_middleware(module)
    return obj


def build_middleware(module: object) -> None:
    """Build the middleware stack of each Starlette (or FastAPI) app in ``module``'s namespace.

    Starlette instantiates middleware on the first request; a middleware that
    declares its site when built (``DBHealthMiddleware``) would otherwise be
    missing from a runbook generated from code that never served a request.
    Apps made by a factory and not kept in the module are not seen.
    """
    for value in list(vars(module).values()):
        if isinstance(value, Starlette) and value.middleware_stack is None:
            value.middleware_stack = value.build_middleware_stack()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m degrade", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    rb = commands.add_parser("runbook", help="print the Markdown runbook of a Registry")
    rb.add_argument("registry", help="module:attribute of a degrade.Registry")
    rb.add_argument("--check", metavar="FILE", help="exit 1 with a diff when FILE differs")
    al = commands.add_parser("alerts", help="print Prometheus alert rules for a Registry")
    al.add_argument("registry", help="module:attribute of a degrade.Registry")
    al.add_argument("--runbook-base", default="", help="prefix for runbook_url annotations (a URL)")
    px = commands.add_parser(
        "proxy",
        help="run fault proxies in front of services, switched over HTTP or stdin",
        description=proxy_cli.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    proxy_cli.add_arguments(px)
    ob = commands.add_parser("outbox-ddl", help="print the SQL that creates a transactional outbox table")
    ob.add_argument("--table", default="degrade_outbox", help="name or schema.name (default degrade_outbox)")
    args = parser.parse_args(argv)
    if args.command == "proxy":
        return proxy_cli.run(args)
    if args.command == "outbox-ddl":
        return _outbox_ddl(args.table)
    return _registry_command(args)


def _outbox_ddl(table: str) -> int:
    """``outbox-ddl``: the statements of ``Outbox.create_table()``, for a migration (Alembic)."""
    from .eventbus._outbox import check_table, ddl_statements
    from .exceptions import ConfigurationError

    try:
        statements = ddl_statements(check_table(table))
    except ConfigurationError as exc:
        print(f"python -m degrade: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write("".join(f"{statement};\n\n" for statement in statements))
    return 0


def _registry_command(args: argparse.Namespace) -> int:
    """``runbook`` and ``alerts``: import the Registry, render it."""
    if not structlog.is_configured():
        # This process is ours: keep what the imported app logs off the generated output.
        # (sys.stderr looked up per logger: main() run in-process, by a test capturing stderr,
        # must not leave structlog writing to a stream that is closed afterwards)
        structlog.configure(logger_factory=lambda *_: structlog.PrintLogger(sys.stderr))
    try:
        registry = load_registry(args.registry)
    except UsageError as exc:
        print(f"python -m degrade: {exc}", file=sys.stderr)
        return 2
    if args.command == "alerts":
        sys.stdout.write(render_alerts(registry, runbook_base=args.runbook_base))
        return 0
    text = render_runbook(registry)
    if args.check is None:
        sys.stdout.write(text)
        return 0
    path = Path(args.check)
    try:
        current = path.read_text(encoding="utf-8")
    except OSError as exc:
        print(f"python -m degrade: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return 2
    if current == text:
        return 0
    diff = difflib.unified_diff(
        current.splitlines(keepends=True), text.splitlines(keepends=True), str(path), "generated"
    )
    sys.stdout.writelines(diff)
    print(f"\n{path} is stale: regenerate it with python -m degrade runbook {args.registry} > {path}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
