"""The `apim-remediator` command: the same use cases as the Functions app, from a shell.

A thin adapter like function_app.py: parse arguments, build the composition root once,
call a handler, print, exit with a code pipelines can gate on.
Exit codes: 0 clean, 1 findings at or above --fail-on (or an instance not scanned; with
--fail-on also a partial result unless --allow-partial), 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from handlers.context import AppContext
from handlers.remediate import RemediateRequest, remediate
from handlers.remediation_report import render_remediation_json, render_remediation_table
from handlers.scan import Progress, ScanRequest, scan
from shared import __version__
from shared.azure import ClientFactory
from shared.errors import RemediatorError
from shared.journal import Trigger, TriggerKind
from shared.model import Severity
from shared.policy import Policy, load_policy
from shared.read_plan import parts_needed
from shared.report import RENDERERS, ScanReport, render_rules_markdown
from shared.report_stream import STREAM_WRITERS
from shared.rules import REGISTRY
from shared.settings import load_settings
from shared.source import AzureInstanceSource


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apim-remediator", description="Keep Azure API Management secure.")
    parser.add_argument("--version", action="version", version=f"apim-remediator {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    scan_cmd = commands.add_parser("scan", help="detect drift on the APIM instances in scope (read-only)")
    scan_cmd.add_argument("--subscription", action="append", default=[], metavar="ID", help="only this subscription")
    scan_cmd.add_argument("--resource-group", action="append", default=[], metavar="NAME", help="only this group")
    scan_cmd.add_argument("--instance", action="append", default=[], metavar="ID", help="only this APIM resource id")
    scan_cmd.add_argument("--format", choices=sorted({*RENDERERS, *STREAM_WRITERS}), default="table")
    scan_cmd.add_argument(
        "--stream",
        action="store_true",
        help="write each instance's result as soon as it is read instead of the whole report at the end "
        "(jsonl always streams; sarif with --stream): memory stays flat for a large estate",
    )
    scan_cmd.add_argument("--output", metavar="FILE", help="write the report here instead of stdout")
    scan_cmd.add_argument(
        "--fail-on",
        choices=[s.value for s in Severity],
        help="exit 1 when a finding no exemption covers is at least this severe",
    )
    scan_cmd.add_argument(
        "--allow-partial",
        action="store_true",
        help="with --fail-on: do not fail because a part of an instance could not be read or a rule failed",
    )
    scan_cmd.add_argument("--quiet", action="store_true", help="no progress on stderr")
    fix = commands.add_parser("remediate", help="plan (default) or apply the fixes for one APIM instance")
    fix.add_argument("--instance", required=True, metavar="ID", help="the APIM service's resource id")
    fix.add_argument("--rule", action="append", default=[], metavar="RULE", help="only this rule (repeatable)")
    fix.add_argument(
        "--apply",
        action="store_true",
        help="make the changes (only rules the policy puts in remediate mode); without it: a dry run",
    )
    fix.add_argument("--format", choices=["table", "json"], default="table")
    fix.add_argument(
        "--lease-wait",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for another worker's lease on the instance",
    )
    rules_cmd = commands.add_parser("rules", help="list the rule catalogue")
    rules_cmd.add_argument("--format", choices=["table", "markdown"], default="table")
    return parser


def _rules(args: argparse.Namespace, out: TextIO) -> int:
    if args.format == "markdown":
        out.write(render_rules_markdown())
        return 0
    for rule_id in sorted(REGISTRY):
        rule = REGISTRY[rule_id]
        fix = "fix" if rule.remediable else "detect"
        out.write(f"{rule.id:<9} {rule.severity.value:<8} {fix:<6} {rule.title}\n")
    return 0


def _progress(stream: TextIO) -> Progress:
    def report(done: int, total: int, instance_id: str) -> None:
        print(f"[{done}/{total}] scanned {instance_id.rsplit('/', 1)[-1]}", file=stream, flush=True)

    return report


async def _scan(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    settings = load_settings()
    policy = load_policy(settings.policy_file, today=datetime.now(UTC).date())
    outside = [s for s in args.subscription if s.lower() not in settings.subscription_ids]
    if outside:
        print(f"apim-remediator: subscription(s) outside APIMR_SUBSCRIPTION_IDS: {', '.join(outside)}", file=err)
        return 2
    streaming = args.format == "jsonl" or (args.stream and args.format in STREAM_WRITERS)
    if args.stream and not streaming:
        print(f"apim-remediator: --stream writes jsonl or sarif, not {args.format}", file=err)
        return 2
    factory = ClientFactory(settings)
    # A scan reads only what the rules the policy runs read (shared/read_plan.py).
    source = AzureInstanceSource(factory, settings, parts=parts_needed(policy))
    request = ScanRequest(
        subscription_ids=tuple(args.subscription),
        resource_groups=tuple(args.resource_group),
        instance_ids=tuple(args.instance),
    )
    try:
        if streaming:
            return await _stream_scan(request, source, policy, settings.policy_file, args, out, err)
        report = await scan(
            request,
            source,
            policy,
            policy_file=settings.policy_file,
            progress=None if args.quiet else _progress(err),
        )
    finally:
        await factory.aclose()
        factory.close()
    return _print_report(report, args, out)


async def _stream_scan(
    request: ScanRequest,
    source: AzureInstanceSource,
    policy: Policy,
    policy_file: str,
    args: argparse.Namespace,
    out: TextIO,
    err: TextIO,
) -> int:
    """Each instance's result goes to the report file as it is ready; only a tally is kept."""
    with contextlib.ExitStack() as stack:
        target: TextIO = out
        if args.output:
            target = stack.enter_context(await asyncio.to_thread(Path(args.output).open, "w", encoding="utf-8"))
        writer = STREAM_WRITERS[args.format](target)
        writer.begin(datetime.now(UTC), policy_file)
        report = await scan(
            request,
            source,
            policy,
            policy_file=policy_file,
            progress=None if args.quiet else _progress(err),
            on_result=writer.add,
        )
        writer.end(report.finished)
    threshold = Severity(args.fail_on) if args.fail_on else None
    return 1 if writer.tally.fails(threshold, allow_partial=args.allow_partial) else 0


async def _remediate(args: argparse.Namespace, out: TextIO) -> int:
    context = AppContext.load()
    user = getpass.getuser()
    try:
        report = await remediate(
            RemediateRequest(
                instance_id=args.instance,
                trigger=Trigger(TriggerKind.CLI, f"apim-remediator remediate by {user}"),
                rule_ids=tuple(args.rule),
                apply=args.apply,
                lease_wait=args.lease_wait,
            ),
            context.remediation_deps(),
        )
    finally:
        await context.aclose()
    out.write(render_remediation_json(report) if args.format == "json" else render_remediation_table(report))
    if report.stopped:
        return 1
    return 1 if report.writes_failed else 0


def _print_report(report: ScanReport, args: argparse.Namespace, out: TextIO) -> int:
    rendered = RENDERERS[args.format](report)
    if args.output:
        Path(args.output).write_text(rendered, encoding="utf-8")
    else:
        out.write(rendered)
    threshold = Severity(args.fail_on) if args.fail_on else None
    return 1 if report.fails(threshold, allow_partial=args.allow_partial) else 0


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    args = _parser().parse_args(argv)
    try:
        if args.command == "scan":
            return asyncio.run(_scan(args, out, err))
        if args.command == "remediate":
            return asyncio.run(_remediate(args, out))
        if args.command == "rules":
            return _rules(args, out)
    except RemediatorError as error:
        print(f"apim-remediator: {error}", file=err)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
