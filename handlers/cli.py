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
    backup_cmd = commands.add_parser(
        "backup", help="one tick of the backup job: resume running backups, start due ones (BAK-001)"
    )
    backup_cmd.add_argument("--instance", action="append", default=[], metavar="ID", help="only this APIM resource id")
    backup_cmd.add_argument("--force", action="store_true", help="start a backup even when none is due")
    backup_cmd.add_argument(
        "--max-wait", type=float, default=240.0, metavar="SECONDS", help="how long to wait for a running backup"
    )
    restore_cmd = commands.add_parser(
        "restore-test",
        help="one tick of the test-restore job: restore the latest backup into the designated target and verify it",
    )
    restore_cmd.add_argument("--source", action="append", default=[], metavar="ID", help="only this source instance")
    restore_cmd.add_argument(
        "--target", metavar="ID", help="the target (must be the policy's designated target of the one --source)"
    )
    restore_cmd.add_argument("--force", action="store_true", help="start a test-restore even when none is due")
    restore_cmd.add_argument(
        "--max-wait", type=float, default=240.0, metavar="SECONDS", help="how long to wait for a running restore"
    )
    incidents_cmd = commands.add_parser("incidents", help="list open incidents and their delivery state")
    incidents_cmd.add_argument("--all", action="store_true", help="resolved incidents too")
    incidents_cmd.add_argument(
        "--deliver", action="store_true", help="first deliver what the outbox holds (as every run does)"
    )
    incidents_cmd.add_argument("--format", choices=["table", "json"], default="table")
    _rotate_parser(commands)
    rules_cmd = commands.add_parser("rules", help="list the rule catalogue")
    rules_cmd.add_argument("--format", choices=["table", "markdown"], default="table")
    rules_cmd.add_argument(
        "--policy", metavar="FILE", help="also list this policy file's custom rules (validated as a scan would)"
    )
    return parser


def _rotate_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rotate = commands.add_parser(
        "rotate", help="rotate (or onboard, restore, revoke) subscription keys through the Key Vault ledger"
    )
    rotate.add_argument("--instance", required=True, metavar="ID", help="the APIM service's resource id")
    rotate.add_argument(
        "--subscription",
        action="append",
        default=[],
        metavar="SID",
        help="this APIM subscription (name or ARM id; repeatable); default: what KEY-002/003/004 flag",
    )
    rotate.add_argument("--stale", action="store_true", help="only keys past their maximum age or expiry (KEY-003)")
    rotate.add_argument("--revoke", action="store_true", help="a leaked key: rotate, then regenerate the old key too")
    rotate.add_argument(
        "--grace", type=float, default=0.0, metavar="SECONDS", help="with --revoke: how long the old key still works"
    )
    rotate.add_argument(
        "--gateways",
        action="store_true",
        help="renew self-hosted gateway tokens (ledger secrets tagged apim-gateway-id) instead of subscription keys",
    )
    rotate.add_argument(
        "--gateway", action="append", default=[], metavar="NAME", help="with --gateways: only this gateway (repeatable)"
    )
    rotate.add_argument(
        "--force", action="store_true", help="with --gateways: renew tokens that are not near expiry too"
    )
    rotate.add_argument("--apply", action="store_true", help="make the changes; without it: a dry run")
    rotate.add_argument("--format", choices=["table", "json"], default="table")


async def _rotate(args: argparse.Namespace, out: TextIO) -> int:
    from handlers.rotate_keys import RotateKeysRequest, render_rotation, rotate_keys

    if args.gateways or args.gateway or args.force:
        return await _rotate_gateways(args, out)
    context = AppContext.load()
    user = getpass.getuser()
    try:
        report = await rotate_keys(
            RotateKeysRequest(
                instance_id=args.instance,
                trigger=Trigger(TriggerKind.CLI, f"apim-remediator rotate by {user}"),
                subscriptions=tuple(args.subscription),
                stale=args.stale,
                revoke=args.revoke,
                apply=args.apply,
                grace_seconds=args.grace,
            ),
            context.rotation_deps(),
        )
    finally:
        await context.aclose()
    out.write(render_rotation(report, args.format))
    return 1 if report.failed else 0


async def _rotate_gateways(args: argparse.Namespace, out: TextIO) -> int:
    from handlers.rotate_gateways import RotateGatewaysRequest, render_gateways, rotate_gateways

    if args.subscription or args.stale or args.revoke:
        raise RemediatorError("--gateways renews gateway tokens: --subscription, --stale and --revoke do not apply")
    context = AppContext.load()
    user = getpass.getuser()
    try:
        report = await rotate_gateways(
            RotateGatewaysRequest(
                instance_id=args.instance,
                trigger=Trigger(TriggerKind.CLI, f"apim-remediator rotate --gateways by {user}"),
                gateways=tuple(args.gateway),
                force=args.force,
                apply=args.apply,
            ),
            context.gateway_deps(),
        )
    finally:
        await context.aclose()
    out.write(render_gateways(report, args.format))
    return 1 if report.failed else 0


def _rules(args: argparse.Namespace, out: TextIO) -> int:
    # The policy first: a malformed custom rule is a configuration error (exit 2, file:line).
    custom = load_policy(args.policy).custom_rules if args.policy else ()
    if args.format == "markdown":
        out.write(render_rules_markdown())  # docs/rules.md: the catalogue, never one file's rules
        return 0
    catalogue = {**REGISTRY, **{r.id: r for r in custom}}
    for rule_id in sorted(catalogue):
        rule = catalogue[rule_id]
        fix = "fix" if rule.remediable else "detect"
        origin = "  (custom)" if rule_id not in REGISTRY else ""
        out.write(f"{rule.id:<9} {rule.severity.value:<8} {fix:<6} {rule.title}{origin}\n")
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
        writer = STREAM_WRITERS[args.format](target, policy.catalogue())
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


async def _backup(args: argparse.Namespace, out: TextIO) -> int:
    from handlers.backup import BackupOutcome, BackupRequest, run_backups

    context = AppContext.load()
    try:
        result = await run_backups(
            BackupRequest(instance_ids=tuple(args.instance), force=args.force, max_wait=args.max_wait),
            context.backup_deps(),
        )
    finally:
        await context.aclose()
    if context.settings.backup is None:
        print("backups are not configured (APIMR_BACKUP_STORAGE_ACCOUNT is not set)", file=out)
    for item in result.instances:
        detail = " ".join(
            part
            for part in (
                item.blob or "",
                f"{item.duration_s:.1f}s" if item.duration_s is not None else "",
                f"{item.error_code}: {item.error}" if item.error_code else "",
                f"(tier {item.sku})" if item.outcome is BackupOutcome.UNSUPPORTED else "",
                f"pruned {len(item.pruned)}" if item.pruned else "",
            )
            if part
        )
        print(f"{item.outcome.value:<13} {item.instance_id} {detail}".rstrip(), file=out)
    return 1 if result.failed else 0


async def _restore_test(args: argparse.Namespace, out: TextIO) -> int:
    from handlers.restore_test import RestoreOutcome, RestoreTestRequest, run_restore_tests

    context = AppContext.load()
    try:
        result = await run_restore_tests(
            RestoreTestRequest(
                source_ids=tuple(args.source), target_id=args.target, force=args.force, max_wait=args.max_wait
            ),
            context.backup_deps(),
        )
    finally:
        await context.aclose()
    if context.settings.backup is None:
        print("backups are not configured (APIMR_BACKUP_STORAGE_ACCOUNT is not set)", file=out)
    bad = 0
    for item in result.sources:
        bad += item.outcome in (RestoreOutcome.FAILED, RestoreOutcome.REFUSED)
        recovery = f" recovery {item.recovery_s:.1f}s" if item.recovery_s is not None else ""
        into = f" -> {item.target_id}" if item.target_id else ""
        print(f"{item.outcome.value:<11} {item.source_id}{into}{recovery}", file=out)
        if item.error_code:
            print(f"  {item.error_code}: {item.error}", file=out)
        for line in item.differences:
            print(f"  - {line}", file=out)
        for line in item.not_restored:
            print(f"  not in a backup: {line}", file=out)
    return 1 if bad else 0


async def _incidents(args: argparse.Namespace, out: TextIO) -> int:
    import json

    from handlers.incidents import list_incidents, render_incidents

    context = AppContext.load()
    try:
        reporter = context.incidents()
        if args.deliver:
            delivery = await reporter.deliver_pending()
            for line in delivery.failed:
                out.write(f"not delivered: {line}\n")
        views = await list_incidents(reporter, include_resolved=args.all)
    finally:
        await context.aclose()
    if args.format == "json":
        rendered = [
            {
                **view.incident.to_json(),
                "delivery": [
                    {
                        "sink": s.sink,
                        "delivered_version": s.delivered_version,
                        "pending_versions": list(s.pending_versions),
                        "failed_attempts": s.attempts,
                        "last_error": s.last_error,
                    }
                    for s in view.sinks
                ],
            }
            for view in views
        ]
        out.write(json.dumps(rendered, indent=2) + "\n")
    else:
        out.write(render_incidents(views))
    return 0


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
        if args.command == "incidents":
            return asyncio.run(_incidents(args, out))
        if args.command == "rotate":
            return asyncio.run(_rotate(args, out))
        if args.command == "rules":
            return _rules(args, out)
        if args.command == "backup":
            return asyncio.run(_backup(args, out))
        if args.command == "restore-test":
            return asyncio.run(_restore_test(args, out))
    except RemediatorError as error:
        print(f"apim-remediator: {error}", file=err)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
