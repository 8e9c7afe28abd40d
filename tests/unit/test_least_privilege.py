"""Least privilege written twice: the Azure actions each handler's docstring names are
exactly the ones infra/subscription-role.bicep grants (read-only and with remediation)."""

from __future__ import annotations

import re
from pathlib import Path

import handlers.remediate
import handlers.scan

ROOT = Path(__file__).resolve().parents[2]
ACTION = re.compile(r"Microsoft\.[A-Za-z]+/[A-Za-z0-9/*]+")


def bicep_list(name: str) -> set[str]:
    text = (ROOT / "infra" / "subscription-role.bicep").read_text()
    block = re.search(rf"var {name} = \[(.*?)\n\]", text, re.DOTALL)
    assert block, f"no {name} in the Bicep file"
    return set(re.findall(r"'(Microsoft\.[^']+)'", block.group(1)))


def test_scan_docstring_matches_the_read_role() -> None:
    assert set(ACTION.findall(handlers.scan.__doc__ or "")) == bicep_list("readActions")


def test_remediate_and_backup_docstrings_match_the_write_role() -> None:
    import handlers.backup
    import handlers.restore_test
    import handlers.rotate_gateways

    named = set(ACTION.findall(handlers.remediate.__doc__ or ""))
    jobs = set(ACTION.findall(handlers.backup.__doc__ or "")) | set(ACTION.findall(handlers.restore_test.__doc__ or ""))
    jobs |= set(ACTION.findall(handlers.rotate_gateways.__doc__ or ""))
    read = bicep_list("readActions")
    assert named | (jobs - read) == bicep_list("writeActions")
    assert {
        "Microsoft.ApiManagement/service/backup/action",
        "Microsoft.ApiManagement/service/restore/action",
        "Microsoft.ApiManagement/service/gateways/listKeys/action",
        "Microsoft.ApiManagement/service/gateways/regenerateKey/action",
        "Microsoft.ApiManagement/service/gateways/generateToken/action",
    } <= jobs - read


def test_the_sweep_needs_only_reads_the_read_role_grants() -> None:
    import handlers.sweep

    named = set(ACTION.findall(handlers.sweep.__doc__ or ""))
    assert named, "the sweep's docstring names no Azure action"
    assert named <= bicep_list("readActions")


def test_every_trigger_handler_names_its_azure_actions_within_the_roles() -> None:
    import handlers.events
    import handlers.reconcile
    import handlers.rotate_gateways
    import handlers.rotate_keys
    import handlers.sweep
    import handlers.work

    granted = bicep_list("readActions") | bicep_list("writeActions")
    modules = (handlers.sweep, handlers.work, handlers.events, handlers.reconcile, handlers.rotate_keys)
    for module in (*modules, handlers.rotate_gateways):
        doc = module.__doc__ or ""
        assert "Azure actions" in doc, module.__name__
        assert set(ACTION.findall(doc)) <= granted, module.__name__
