"""Which parts of a snapshot the policy's rules read, so a scan skips the rest.

Every rule the policy does not switch off names the `Snapshot` parts it reads in
`RULE_PARTS`; a scan reads their union (plus what reading them takes: `key_hashes` needs
the subscriptions and the key ledger, policies are found through the API and product
lists). A part left out is named in `Snapshot.skipped` (not reported: nobody asked about
it), so a rule that reads it after all stays silent instead of judging an empty list. A
rule missing from the table (a new one) makes the scan read everything: forgetting to
declare costs requests, never findings. `tests/unit/test_read_plan.py`
checks each declaration against what the rule actually touches.

The service itself is always read. Remediation and reconcile read everything: a fix may
plan from parts its rule does not judge.
"""

from __future__ import annotations

from shared.model import Mode
from shared.policy import Policy

# The parts `snapshot.read_snapshot` can leave out (the Snapshot's field names).
OPTIONAL_PARTS = frozenset(
    {
        "subscriptions",
        "tenant_access",
        "git_access",
        "portal",
        "identity_providers",
        "named_values",
        "apis",
        "backends",
        "products",
        "policies",
        "apim_diagnostics",
        "loggers",
        "diagnostic_settings",
        "key_ledger",
        "key_hashes",
        "certificates",
        "workspaces",
    }
)

RULE_PARTS: dict[str, frozenset[str]] = {
    "API-001": frozenset({"apis", "workspaces"}),
    "API-002": frozenset({"apis", "policies", "workspaces"}),
    "API-003": frozenset({"backends", "workspaces"}),
    "API-004": frozenset({"apis", "backends", "policies", "products", "workspaces"}),
    "API-005": frozenset({"apis", "policies", "products", "workspaces"}),
    "API-006": frozenset({"policies", "workspaces"}),
    "ID-001": frozenset(),
    "ID-002": frozenset({"portal"}),
    "ID-003": frozenset({"portal"}),
    "KEY-001": frozenset({"subscriptions", "workspaces"}),
    "KEY-002": frozenset({"key_ledger", "subscriptions"}),
    "KEY-003": frozenset({"key_ledger", "subscriptions"}),
    "KEY-004": frozenset({"key_hashes", "key_ledger", "subscriptions"}),
    "KEY-005": frozenset({"subscriptions", "workspaces"}),
    "LOG-001": frozenset({"diagnostic_settings"}),
    "LOG-002": frozenset({"apim_diagnostics", "loggers"}),
    "LOG-003": frozenset({"apim_diagnostics", "apis"}),
    "MGMT-001": frozenset({"tenant_access"}),
    "MGMT-002": frozenset({"git_access"}),
    "MGMT-003": frozenset(),
    "MGMT-004": frozenset(),
    "NET-001": frozenset(),
    "NET-002": frozenset(),
    "SEC-001": frozenset({"named_values", "workspaces"}),
    "SEC-002": frozenset({"named_values", "workspaces"}),
    "TLS-001": frozenset(),
    "TLS-002": frozenset(),
    "TLS-003": frozenset(),
    # Certificates: hostnames and CA certificates are on the service; the collection is a part.
    "CERT-001": frozenset(),
    "CERT-002": frozenset(),
    "CERT-003": frozenset({"certificates"}),
    # Backup records come from the product's own table (the source adds them), not a read here.
    "BAK-001": frozenset(),
    "BAK-002": frozenset(),
    # The runtime signals are read by reconcile on their own schedule, never by a scan's read.
    "LOG-004": frozenset(),
    "THR-001": frozenset(),
    "THR-002": frozenset(),
    "THR-003": frozenset(),
    "THR-004": frozenset(),
    "THR-005": frozenset(),
}

# Rules that also run in each workspace (`@rule(in_workspaces=True)`) read "workspaces" too.
# What reading a part takes besides itself.
_NEEDS = {
    "key_hashes": frozenset({"subscriptions", "key_ledger"}),
    "policies": frozenset({"apis", "products"}),
}


def parts_needed(policy: Policy) -> frozenset[str]:
    """The optional parts the rules the policy runs read (all of them when one is undeclared,
    which every custom rule of the policy file is: it may look at any kind of resource)."""
    wanted: set[str] = set()
    for rule_id in policy.catalogue():
        if policy.mode_of(rule_id) is Mode.OFF:
            continue
        declared = RULE_PARTS.get(rule_id)
        if declared is None:
            return OPTIONAL_PARTS
        wanted |= declared
    for part in list(wanted):
        wanted |= _NEEDS.get(part, frozenset())
    return frozenset(wanted)
