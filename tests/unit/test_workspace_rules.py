"""Rules inside workspaces, on snapshots built by hand: the workspace view, which findings
it keeps, and the rules that stay at the service level."""

from __future__ import annotations

from dataclasses import replace

from shared.evaluation import evaluate
from shared.model import Api, Policy, PolicyScope, Snapshot, Workspace
from shared.policy import parse_policy
from shared.rules import REGISTRY, evaluate_rule
from shared.rules._workspaces import workspace_view
from tests.factories import NOW, SERVICE_ID, compliant, subscription

WS_ID = f"{SERVICE_ID}/workspaces/team-a"
BROKEN = "<policies><inbound><nonsense"


def ws_api(name: str, **changes: object) -> Api:
    api = Api(
        id=f"{WS_ID}/apis/{name}",
        name=name,
        display_name=name,
        path=f"team-a/{name}",
        protocols=("https",),
        subscription_required=True,
    )
    return replace(api, **changes)  # type: ignore[arg-type]


def with_workspace(snapshot: Snapshot, **parts: object) -> Snapshot:
    return replace(snapshot, workspaces=(Workspace(id=WS_ID, name="team-a", **parts),))  # type: ignore[arg-type]


def test_a_workspace_finding_names_the_workspace_and_is_detect_only() -> None:
    snap = with_workspace(compliant(), apis=(ws_api("legacy", protocols=("http", "https")),))
    [finding] = evaluate_rule("API-001", snap)
    assert finding.resource_id == f"{WS_ID}/apis/legacy"
    assert finding.instance_id == SERVICE_ID
    assert finding.message.startswith("In workspace 'team-a': ")
    assert REGISTRY["API-001"].remediable
    assert finding.remediable is False


def test_the_same_drift_at_service_level_stays_remediable_and_distinct() -> None:
    base = compliant()
    legacy = replace(base.apis[0], protocols=("http", "https"))
    snap = with_workspace(replace(base, apis=(legacy,)), apis=(ws_api("orders", protocols=("http", "https")),))
    found = evaluate_rule("API-001", snap)
    assert [(f.resource_id, f.remediable) for f in found] == [
        (f"{SERVICE_ID}/apis/orders", True),
        (f"{WS_ID}/apis/orders", False),
    ]


def test_the_global_policy_is_reported_once_not_again_per_workspace() -> None:
    base = compliant()
    broken_global = tuple(replace(p, xml=BROKEN) if p.scope is PolicyScope.SERVICE else p for p in base.policies)
    snap = with_workspace(replace(base, policies=broken_global), apis=(ws_api("a"),))
    found = evaluate_rule("API-006", snap)
    assert [f.resource_id for f in found] == [f"{SERVICE_ID}/policies/policy"]


def test_the_workspace_policy_sits_between_global_and_api() -> None:
    # The global policy of `compliant()` rate-limits; a workspace policy without <base /> in
    # inbound drops that for every API of the workspace.
    drops = "<policies><inbound /><backend><base /></backend><outbound><base /></outbound></policies>"
    keeps = "<policies><inbound><base /></inbound><backend><base /></backend><outbound><base /></outbound></policies>"
    for xml, expected in ((keeps, []), (drops, [f"{WS_ID}/apis/a"])):
        own = Policy(id=f"{WS_ID}/policies/policy", scope=PolicyScope.WORKSPACE, owner="", xml=xml)
        snap = with_workspace(compliant(), apis=(ws_api("a"),), policies=(own,))
        assert [f.resource_id for f in evaluate_rule("API-005", snap)] == expected


def test_a_workspace_without_a_token_check_is_open_even_if_another_workspace_validates() -> None:
    validates = (
        "<policies><inbound><base /><validate-jwt header-name='Authorization' /></inbound>"
        "<backend><base /></backend><outbound><base /></outbound></policies>"
    )
    open_api = ws_api("open", subscription_required=False)
    other = Workspace(
        id=f"{SERVICE_ID}/workspaces/team-b",
        name="team-b",
        apis=(replace(open_api, id=f"{SERVICE_ID}/workspaces/team-b/apis/open"),),
        policies=(Policy(f"{SERVICE_ID}/workspaces/team-b/policies/policy", PolicyScope.WORKSPACE, "", validates),),
    )
    snap = replace(compliant(), workspaces=(Workspace(id=WS_ID, name="team-a", apis=(open_api,)), other))
    assert [f.resource_id for f in evaluate_rule("API-002", snap)] == [f"{WS_ID}/apis/open"]


def test_key_ledger_rules_do_not_look_at_workspace_subscriptions() -> None:
    # With a ledger configured and read, KEY-002 would call an untracked service-level key out;
    # a workspace key is not the ledger's business and must not be.
    ws_sub = replace(subscription("w"), id=f"{WS_ID}/subscriptions/w", scope=f"{WS_ID}/apis/a")
    snap = with_workspace(compliant(), subscriptions=(ws_sub,))
    for rule_id in ("KEY-002", "KEY-003", "KEY-004"):
        assert not REGISTRY[rule_id].in_workspaces
        assert evaluate_rule(rule_id, snap) == [], rule_id
    view = workspace_view(snap, snap.workspaces[0])
    assert not view.readable("key_ledger")
    assert view.key_ledger == ()
    assert snap.key_ledger  # the service's ledger was read; the view leaves it out


def test_view_unreadable_parts_are_the_workspaces_own_and_the_global_policy() -> None:
    base = compliant()
    snap = replace(
        with_workspace(base),
        unreadable=(
            "apis: 503 ServiceUnavailable",
            "policies: 403 AuthorizationFailed",
            "workspaces/team-a/named_values: 403 AuthorizationFailed",
            "workspaces/team-b/apis: 503 ServiceUnavailable",
        ),
    )
    view = workspace_view(snap, snap.workspaces[0])
    assert view.unreadable == ("policies: 403 AuthorizationFailed", "named_values: 403 AuthorizationFailed")
    assert view.readable("apis")
    assert not view.readable("named_values")
    assert view.workspaces == ()
    assert view.read_at == NOW


def test_every_rule_says_whether_it_runs_in_workspaces() -> None:
    in_workspaces = {r.id for r in REGISTRY.values() if r.in_workspaces}
    assert in_workspaces == {
        "API-001", "API-002", "API-003", "API-004", "API-005", "API-006", "KEY-001", "KEY-005", "SEC-001", "SEC-002",
    }  # fmt: skip
    for rule_id in in_workspaces:
        assert "workspace" in REGISTRY[rule_id].workspace_note, rule_id


def test_exemptions_and_modes_apply_to_workspace_findings_too() -> None:
    snap = with_workspace(compliant(), apis=(ws_api("legacy", protocols=("http",)),))
    policy = parse_policy(
        "version: 1\nexemptions:\n  - {rule: API-001, resource: '**/workspaces/team-a', reason: migrating,"
        " expires: '2099-01-01'}\n",
        source="policy.yaml",
    )
    [finding] = [f for f in evaluate(snap, policy, today=NOW.date()).findings if f.rule_id == "API-001"]
    assert finding.exempt


def test_a_custom_rule_on_workspaces_sees_each_workspace_as_a_whole() -> None:
    policy = parse_policy(
        "version: 1\ncustom_rules:\n"
        "  - id: X-WS-001\n    title: Workspaces hold no backends of their own\n    severity: low\n"
        "    rationale: backends are the platform team's\n    resource: workspaces\n"
        "    require: {field: backends, absent: true}\n",
        source="policy.yaml",
    )
    snap = with_workspace(compliant(), apis=(ws_api("a"),))
    with_backend = replace(
        snap,
        workspaces=(
            *snap.workspaces,
            Workspace(
                id=f"{SERVICE_ID}/workspaces/team-b",
                name="team-b",
                backends=(replace(compliant().backends[0], id=f"{SERVICE_ID}/workspaces/team-b/backends/orders"),),
            ),
        ),
    )
    found = [f for f in evaluate(with_backend, policy, today=NOW.date()).findings if f.rule_id == "X-WS-001"]
    assert [f.resource_id for f in found] == [f"{SERVICE_ID}/workspaces/team-b"]
