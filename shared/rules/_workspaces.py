"""Workspace views: the rules that apply inside workspaces see each workspace as a snapshot.

A view is the instance's snapshot with the service-level APIs, products, subscriptions,
named values, backends and policies replaced by one workspace's, and the global policy
kept (APIM runs it in front of every workspace: global -> workspace -> product -> API).
Parts nothing in a workspace corresponds to are left empty, and the key ledger is
"not configured" there: it tracks the service's subscriptions only, so the ledger rules
stay silent instead of calling every workspace key untracked. A finding from a view is
kept only when it is about a resource inside the workspace (so the global policy is never
reported twice), says which workspace, and is detect-only: the remediations write the
service-level resources and are never pointed at a workspace's.
"""

from __future__ import annotations

from dataclasses import replace

from shared.model import WORKSPACE_PARTS, Finding, PolicyScope, Snapshot, Workspace

LEDGER_NOT_KEPT = "not kept for workspace subscriptions (the key ledger tracks the service's)"


def workspace_part(workspace: Workspace, part: str) -> str:
    """The name an unreadable part of `workspace` has in `Snapshot.unreadable`."""
    return f"workspaces/{workspace.name}/{part}"


def workspace_view(snapshot: Snapshot, workspace: Workspace) -> Snapshot:
    """`snapshot` as the rules see it inside `workspace`."""
    prefix = workspace_part(workspace, "").lower()
    unreadable: list[str] = []
    for entry in snapshot.unreadable:
        part = entry.split(":", 1)[0]
        if part.lower().startswith(prefix):
            unreadable.append(entry[len(prefix) :])
        elif part.startswith("workspaces"):
            continue  # another workspace's, or the listing's (then there is no workspace to view)
        elif part in WORKSPACE_PARTS and part != "policies":
            continue  # the service level's part; the workspace's own was read separately
        else:
            unreadable.append(entry)  # e.g. the global policy: the workspace's chains start with it
    not_configured = [
        *(n for n in snapshot.not_configured if n.split(":", 1)[0] not in ("key_ledger", "key_hashes")),
        f"key_ledger: {LEDGER_NOT_KEPT}",
        f"key_hashes: {LEDGER_NOT_KEPT}",
    ]
    return replace(
        snapshot,
        apis=workspace.apis,
        products=workspace.products,
        subscriptions=workspace.subscriptions,
        named_values=workspace.named_values,
        backends=workspace.backends,
        policies=(*(p for p in snapshot.policies if p.scope is PolicyScope.SERVICE), *workspace.policies),
        key_ledger=(),
        key_hashes=(),
        apim_diagnostics=(),
        loggers=(),
        certificates=(),
        workspaces=(),
        signals=None,
        unreadable=tuple(unreadable),
        not_configured=tuple(not_configured),
    )


def in_workspace(finding: Finding, workspace: Workspace) -> Finding | None:
    """A view's finding as the workspace's (named, detect-only), or None when it is about
    something outside the workspace."""
    if not finding.resource_id.lower().startswith(workspace.id.lower().rstrip("/") + "/"):
        return None
    return replace(finding, remediable=False, message=f"In workspace '{workspace.name}': {finding.message}")
