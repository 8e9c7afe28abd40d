"""Policy as code: which rules run, in which mode, with which parameters, and what is exempt.

The policy is a YAML file (setting APIMR_POLICY_FILE; the shipped default is
`shared/baseline.yaml`: every rule detects, nothing remediates). The format is documented
for operators in docs/policy.md. `load_policy` validates the whole file against the rule
catalogue (`shared.rules.REGISTRY`) and raises one `PolicyError` listing every problem, each
as `file:line: key.path: what is wrong; what is allowed`.

The file is read with PyYAML's node API (`yaml.compose` with SafeLoader resolution) rather
than `safe_load`, because only nodes keep line numbers and only the node tree shows
duplicate keys (`safe_load` silently keeps the last one).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from shared.custom_rules import read_custom_rules
from shared.errors import PermanentError
from shared.model import Exemption, Mode
from shared.rules import REGISTRY, Param, ParamValue, Rule

EXEMPT_TAG = "apim-remediator-exempt"
EXEMPT_REASON_TAG = "apim-remediator-exempt-reason"
DEFAULT_MAX_WRITES_PER_RUN = 20
FORMAT_VERSION = 1

_TOP_KEYS = (
    "version",
    "scope",
    "defaults",
    "rules",
    "exemptions",
    "limits",
    "tag_exemptions",
    "backups",
    "custom_rules",
)
_BACKUP_KEYS = ("every_hours", "retention", "restore_tests")
_RETENTION_KEYS = ("keep_last", "max_age_days")
_RESTORE_TEST_KEYS = ("every_days", "targets")
# The tag a restore-test target must carry, naming (by resource id) the source whose backups
# may overwrite it. The policy's mapping AND this tag must agree before anything is restored.
RESTORE_TARGET_TAG = "apim-remediator-restore-target-for"
_APIM_ID = re.compile(
    r"/subscriptions/[0-9a-fA-F-]{36}/resourceGroups/[-\w._()]{1,90}/providers/Microsoft\.ApiManagement/service/"
    r"[a-zA-Z](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?",
    re.IGNORECASE,
)
_SCOPE_KEYS = ("subscriptions", "resource_groups", "tags")
_RULE_KEYS = ("mode", "params")
_EXEMPTION_KEYS = ("rule", "resource", "reason", "expires")
_LIMIT_KEYS = ("max_writes_per_run",)
_RENAMED_LIMITS = {"max_writes_per_sweep": "max_writes_per_run"}
_GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_RESOURCE_GROUP = re.compile(r"[-\w._()]{1,90}")
_STR = "tag:yaml.org,2002:str"
_NULL = "tag:yaml.org,2002:null"


# -- errors ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyProblem:
    """One thing wrong in a policy file, where it is, and what is allowed instead."""

    file: str
    line: int  # 1-based; 0 when the problem is about the whole file
    column: int  # 1-based; 0 when unknown
    key: str  # e.g. "rules.KEY-003.params.max_age_days"; "" for the file itself
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class PolicyError(PermanentError):
    """The policy file is unreadable or invalid; lists every problem at once."""

    def __init__(self, source: str, problems: Iterable[PolicyProblem]) -> None:
        self.source = source
        self.details = tuple(problems)
        self.problems = [str(p) for p in self.details]
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            f"{len(self.problems)} problem(s) in the policy file {source} (reference: docs/policy.md):\n{lines}"
        )


# -- the policy ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scope:
    """What the policy narrows the settings' scope to; an empty field does not narrow."""

    subscriptions: tuple[str, ...] = ()  # lowercase GUIDs
    resource_groups: tuple[str, ...] = ()  # lowercase names
    tags: tuple[tuple[str, str], ...] = ()  # every (name, value) must be on the resource

    def allows(self, subscription_id: str, resource_group: str, tags: Mapping[str, str]) -> bool:
        if self.subscriptions and subscription_id.lower() not in self.subscriptions:
            return False
        if self.resource_groups and resource_group.lower() not in self.resource_groups:
            return False
        # Azure tag names are case-insensitive; values are compared as written.
        lowered = {k.lower(): v for k, v in tags.items()}
        return all(lowered.get(name.lower()) == value for name, value in self.tags)


@dataclass(frozen=True)
class PolicyExemption:
    """An exemption written in the policy file: one rule (or "*") for resources matching a glob."""

    rule: str  # a rule id, or "*" for every rule
    resource: str  # an ARM id or a glob; covers the matching resources and their children
    reason: str
    expires: date  # the last day the exemption applies
    line: int = 0

    def matches(self, rule_id: str, resource_id: str, today: date) -> bool:
        if today > self.expires:
            return False
        if self.rule != "*" and self.rule.lower() != rule_id.lower():
            return False
        return _glob(self.resource).fullmatch(resource_id) is not None


@lru_cache(maxsize=512)
def _glob(pattern: str) -> re.Pattern[str]:
    """`*` and `?` stay within one path segment, `**` crosses segments; children match too."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    body = "".join(out).rstrip("/") if pattern != "/" else ""
    return re.compile(body + r"(?:/.*)?", re.IGNORECASE)


def _frozen(values: Mapping[str, ParamValue]) -> Mapping[str, ParamValue]:
    return MappingProxyType(dict(values))


@dataclass(frozen=True)
class BackupPolicy:
    """When backups and test-restores start, how many backups are kept, and which instance
    each source's backups are test-restored into (docs/policy.md, `backups`)."""

    every_hours: int = 24  # a new backup when the newest started one is older than this
    keep_last: int = 7  # retention by count ...
    max_age_days: int = 30  # ... and by age (Azure refuses to restore a backup older than 30 days)
    restore_test_every_days: int = 7
    # source instance id (lowercase) -> target instance id (as written)
    restore_targets: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def restore_target_of(self, source_id: str) -> str | None:
        return self.restore_targets.get(source_id.lower().rstrip("/"))


@dataclass(frozen=True)
class Policy:
    """A validated policy. `Policy()` is the shipped baseline: every rule detects."""

    source: str = "(built-in default)"
    default_mode: Mode = Mode.DETECT
    modes: Mapping[str, Mode] = field(default_factory=lambda: MappingProxyType({}))
    overrides: Mapping[str, Mapping[str, ParamValue]] = field(default_factory=lambda: MappingProxyType({}))
    exemptions: tuple[PolicyExemption, ...] = ()
    scope: Scope = field(default_factory=Scope)
    max_writes_per_run: int = DEFAULT_MAX_WRITES_PER_RUN
    tag_exemptions: bool = True
    backups: BackupPolicy = field(default_factory=BackupPolicy)
    # The file's `custom_rules:` (shared.custom_rules), as rules like the catalogue's: detect only.
    custom_rules: tuple[Rule, ...] = ()

    def rule(self, rule_id: str) -> Rule:
        """A catalogue rule or one of this policy's custom rules. KeyError for an unknown rule."""
        if rule_id in REGISTRY:
            return REGISTRY[rule_id]
        for custom in self.custom_rules:
            if custom.id == rule_id:
                return custom
        raise KeyError(rule_id)

    def catalogue(self) -> dict[str, Rule]:
        """Every rule this policy can run, by id: the registry's and the file's own."""
        return {**REGISTRY, **{r.id: r for r in self.custom_rules}}

    def mode_of(self, rule_id: str) -> Mode:
        """The rule's mode: its own entry, else `defaults.mode`. KeyError for an unknown rule."""
        known = self.rule(rule_id)
        return self.modes.get(known.id, self.default_mode)

    def params_of(self, rule_id: str) -> Mapping[str, ParamValue]:
        """The rule's parameters: its defaults overridden by the policy. KeyError for an unknown rule."""
        values = self.rule(rule_id).defaults()
        values.update(self.overrides.get(rule_id, {}))
        return _frozen(values)

    def exemption_for(self, rule_id: str, resource_id: str, tags: Mapping[str, str], today: date) -> Exemption | None:
        """Why a finding of `rule_id` on `resource_id` is exempt, or None.

        `tags` are the APIM service's tags: `apim-remediator-exempt: RULE1,RULE2` (or `*`)
        exempts every finding of those rules on that instance. Policy exemptions win (they
        carry an expiry); one whose `expires` is before `today` no longer applies.
        """
        for exemption in self.exemptions:
            if exemption.matches(rule_id, resource_id, today):
                return Exemption(reason=exemption.reason, source="policy", expires=exemption.expires.isoformat())
        if not self.tag_exemptions:
            return None
        listed = _tag_value(tags, EXEMPT_TAG)
        if listed is None:
            return None
        ids = {item.lower() for item in _split_tag(listed)}
        if "*" not in ids and rule_id.lower() not in ids:
            return None
        reason = (_tag_value(tags, EXEMPT_REASON_TAG) or "").strip()
        return Exemption(reason=reason or f"tag {EXEMPT_TAG} on the APIM instance", source="tag")

    def tag_problems(self, tags: Mapping[str, str]) -> list[str]:
        """`tag_problems(tags)`, plus a note when this policy ignores the exemption tag."""
        if not self.tag_exemptions and _tag_value(tags, EXEMPT_TAG) is not None:
            return [f"tag {EXEMPT_TAG} is ignored: the policy sets tag_exemptions: false"]
        return tag_problems(tags, extra_ids=[r.id for r in self.custom_rules])

    def in_scope(self, subscription_id: str, resource_group: str, tags: Mapping[str, str]) -> bool:
        """Whether the policy's scope admits an instance (the settings' scope is checked separately)."""
        return self.scope.allows(subscription_id, resource_group, tags)


def _tag_value(tags: Mapping[str, str], name: str) -> str | None:
    # Azure tag names are case-insensitive.
    for key, value in tags.items():
        if key.lower() == name:
            return value
    return None


def _split_tag(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def tag_problems(tags: Mapping[str, str], extra_ids: Iterable[str] = ()) -> list[str]:
    """What is wrong with an instance's exemption tag (unknown rule ids), for the scan to print.

    `exemption_for` never fails on a bad tag: it ignores entries it does not know.
    """
    listed = _tag_value(tags, EXEMPT_TAG)
    if listed is None:
        return []
    entries = _split_tag(listed)
    if not entries:
        return [f"tag {EXEMPT_TAG} is empty; expected rule ids separated by commas, or *"]
    known = {rid.lower() for rid in (*REGISTRY, *extra_ids)}
    problems = []
    for entry in entries:
        if entry != "*" and entry.lower() not in known:
            problems.append(
                f"tag {EXEMPT_TAG}: {entry!r} is not a known rule id and exempts nothing{_suggest(entry)}; "
                f"expected rule ids separated by commas, or *"
            )
    return problems


def _suggest(word: str) -> str:
    """A hint for the usual slips: case, a missing or odd separator, the letter O for zero."""

    def folded(text: str) -> str:
        return re.sub(r"[^A-Z0-9]", "", text.upper()).replace("O", "0")

    for rule_id in sorted(REGISTRY):
        if folded(rule_id) == folded(word):
            return f" (did you mean {rule_id}?)"
    return ""


def _known_ids() -> str:
    return ", ".join(sorted(REGISTRY)) or "(none registered)"


# -- loading ---------------------------------------------------------------------------------


def load_policy(path: str | Path, *, today: date | None = None) -> Policy:
    """Read and validate a policy file; raise one PolicyError listing every problem.

    `today` (default: the current UTC date) decides which exemptions have expired; an
    exemption that expires today is still valid today.
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise PolicyError(source, [PolicyProblem(source, 0, 0, "", f"cannot read the policy file: {reason}")]) from exc
    return parse_policy(text, source=source, today=today)


def parse_policy(text: str, *, source: str, today: date | None = None) -> Policy:
    """Validate policy YAML already in memory; `source` names it in messages."""
    reader = _Reader(source, today or datetime.now(UTC).date())
    policy = reader.read(text)
    if reader.problems:
        raise PolicyError(source, sorted(reader.problems, key=lambda p: (p.line, p.column)))
    assert policy is not None  # no problems means a policy was built
    return policy


class _Reader:
    """Walks the node tree, converting what is valid and recording every problem."""

    def __init__(self, source: str, today: date) -> None:
        self.source = source
        self.today = today
        self.problems: list[PolicyProblem] = []
        self.custom: dict[str, Rule] = {}  # the file's custom rules, read before rules and exemptions
        self._constructor = yaml.constructor.SafeConstructor()

    # -- plumbing

    def problem(self, node: yaml.Node | None, key: str, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else 0
        column = node.start_mark.column + 1 if node is not None else 0
        self.problems.append(PolicyProblem(self.source, line, column, key, message))

    def mapping(
        self, node: yaml.Node, key: str, allowed: Iterable[str] | None
    ) -> list[tuple[str, yaml.Node, yaml.Node]]:
        """The (key, key node, value node) entries of a mapping; unknown/duplicate keys reported."""
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, key, f"expected a mapping, got {_describe(node)}")
            return []
        allowed_keys = tuple(allowed) if allowed is not None else None
        seen: dict[str, int] = {}
        entries: list[tuple[str, yaml.Node, yaml.Node]] = []
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                self.problem(key_node, key or "(top level)", "merge keys (<<) are not supported; write the keys out")
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self.problem(key_node, key or "(top level)", f"expected a plain key, got {_describe(key_node)}")
                continue
            name = key_node.value
            path = f"{key}.{name}" if key else name
            if name in seen:
                self.problem(
                    key_node,
                    path,
                    f"duplicate key (first at line {seen[name]}); YAML would silently keep only the last one",
                )
                continue
            seen[name] = key_node.start_mark.line + 1
            if allowed_keys is not None and name not in allowed_keys:
                if key == "limits" and name in _RENAMED_LIMITS:
                    self.problem(
                        key_node,
                        path,
                        f"renamed to limits.{_RENAMED_LIMITS[name]}: the write budget is charged per remediation "
                        "run (one instance), every executed write counted",
                    )
                    continue
                self.problem(key_node, path, f"unknown key; allowed: {', '.join(allowed_keys)}")
                continue
            entries.append((name, key_node, value_node))
        return entries

    def scalar(self, node: yaml.Node) -> tuple[bool, Any]:
        """(ok, value) of a scalar node with SafeLoader semantics; not ok for invalid literals."""
        if not isinstance(node, yaml.ScalarNode):
            return False, None
        try:
            return True, self._constructor.construct_object(node)
        except (ValueError, yaml.YAMLError):
            return False, None

    def string(self, node: yaml.Node, key: str, what: str) -> str | None:
        if isinstance(node, yaml.ScalarNode) and node.tag == _STR and node.value.strip():
            return str(node.value).strip()
        self.problem(node, key, f"expected {what}, got {_describe(node)}")
        return None

    def strings(self, node: yaml.Node, key: str, what: str) -> list[tuple[str, yaml.Node]]:
        if _is_null(node):
            return []
        if not isinstance(node, yaml.SequenceNode):
            self.problem(node, key, f"expected a list of {what}, got {_describe(node)}")
            return []
        out: list[tuple[str, yaml.Node]] = []
        for i, item in enumerate(node.value):
            # Plain scalars only: a name like "no" or a number-like id is still text here.
            if isinstance(item, yaml.ScalarNode) and item.tag != _NULL and item.value.strip():
                out.append((str(item.value).strip(), item))
            else:
                self.problem(item, f"{key}[{i}]", f"expected {what}, got {_describe(item)}")
        return out

    # -- the document

    def read(self, text: str) -> Policy | None:
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark is not None else 0
            column = mark.column + 1 if mark is not None else 0
            what = " ".join(p for p in (exc.context, exc.problem) if p)
            if "alias" in what:
                what += ' (a lone * starts a YAML alias: quote it, as in rule: "*")'
            self.problems.append(PolicyProblem(self.source, line, column, "", f"not valid YAML: {what}"))
            return None
        except yaml.YAMLError as exc:
            self.problems.append(PolicyProblem(self.source, 0, 0, "", f"not valid YAML: {exc}"))
            return None
        if root is None or _is_null(root):
            self.problem(None, "", "the file is empty; a policy is a mapping that starts with 'version: 1'")
            return None
        if not isinstance(root, yaml.MappingNode):
            self.problem(root, "", f"expected a mapping at the top level (version, rules, ...), got {_describe(root)}")
            return None

        entries = {name: (key_node, value) for name, key_node, value in self.mapping(root, "", _TOP_KEYS)}
        if "version" not in entries:
            self.problem(root, "version", f"is required; allowed: {FORMAT_VERSION}")
        else:
            ok, version = self.scalar(entries["version"][1])
            if not ok or type(version) is not int or version != FORMAT_VERSION:
                self.problem(
                    entries["version"][1], "version", f"unsupported version {_raw(entries['version'][1])}; allowed: 1"
                )

        if "custom_rules" in entries and not _is_null(entries["custom_rules"][1]):
            found = read_custom_rules(self, entries["custom_rules"][1], REGISTRY)
            self.custom = {c.id: c.as_rule() for c in found}
        default_mode = Mode.DETECT
        if "defaults" in entries and not _is_null(entries["defaults"][1]):
            default_mode = self.defaults(entries["defaults"][1])
        modes: dict[str, Mode] = {}
        overrides: dict[str, dict[str, ParamValue]] = {}
        if "rules" in entries and not _is_null(entries["rules"][1]):
            self.rules(entries["rules"][1], modes, overrides)
        exemptions: list[PolicyExemption] = []
        if "exemptions" in entries and not _is_null(entries["exemptions"][1]):
            exemptions = self.exemptions(entries["exemptions"][1])
        scope = Scope()
        if "scope" in entries and not _is_null(entries["scope"][1]):
            scope = self.scope(entries["scope"][1])
        max_writes = DEFAULT_MAX_WRITES_PER_RUN
        if "limits" in entries and not _is_null(entries["limits"][1]):
            max_writes = self.limits(entries["limits"][1])
        tag_exemptions = True
        if "tag_exemptions" in entries:
            node = entries["tag_exemptions"][1]
            ok, value = self.scalar(node)
            if ok and isinstance(value, bool):
                tag_exemptions = value
            else:
                self.problem(node, "tag_exemptions", f"expected true or false, got {_raw(node)}")
        backups = BackupPolicy()
        if "backups" in entries and not _is_null(entries["backups"][1]):
            backups = self.backups(entries["backups"][1])

        return Policy(
            source=self.source,
            default_mode=default_mode,
            modes=MappingProxyType(modes),
            overrides=MappingProxyType({rid: _frozen(values) for rid, values in overrides.items()}),
            exemptions=tuple(exemptions),
            scope=scope,
            max_writes_per_run=max_writes,
            tag_exemptions=tag_exemptions,
            backups=backups,
            custom_rules=tuple(self.custom.values()),
        )

    def count(self, node: yaml.Node, key: str, low: int, high: int) -> int | None:
        ok, number = self.scalar(node)
        if ok and isinstance(number, int) and not isinstance(number, bool) and low <= number <= high:
            return number
        self.problem(node, key, f"expected an integer >= {low} and <= {high}, got {_raw(node)}")
        return None

    def backups(self, node: yaml.Node) -> BackupPolicy:
        values: dict[str, Any] = {}
        targets: dict[str, str] = {}
        for name, _, value in self.mapping(node, "backups", _BACKUP_KEYS):
            if name == "every_hours":
                values["every_hours"] = self.count(value, "backups.every_hours", 1, 24 * 30)
            elif name == "retention" and not _is_null(value):
                for item, _, item_value in self.mapping(value, "backups.retention", _RETENTION_KEYS):
                    low, high = (1, 1000) if item == "keep_last" else (1, 30)
                    values[item] = self.count(item_value, f"backups.retention.{item}", low, high)
            elif name == "restore_tests" and not _is_null(value):
                for item, _, item_value in self.mapping(value, "backups.restore_tests", _RESTORE_TEST_KEYS):
                    if item == "every_days":
                        values["restore_test_every_days"] = self.count(
                            item_value, "backups.restore_tests.every_days", 1, 365
                        )
                    elif item == "targets" and not _is_null(item_value):
                        self.restore_targets(item_value, targets)
        return BackupPolicy(
            **{k: v for k, v in values.items() if v is not None},
            restore_targets=MappingProxyType(targets),
        )

    def restore_targets(self, node: yaml.Node, targets: dict[str, str]) -> None:
        key = "backups.restore_tests.targets"
        used: dict[str, str] = {}
        for source, key_node, value in self.mapping(node, key, None):
            where = f"{key}.{source}"
            target = self.string(value, where, "the resource id of the restore-test target")
            if not _APIM_ID.fullmatch(source.rstrip("/")):
                self.problem(key_node, where, "expected an APIM service resource id as the key (the backup source)")
                continue
            if target is None:
                continue
            if not _APIM_ID.fullmatch(target.rstrip("/")):
                self.problem(value, where, f"expected an APIM service resource id, got {target!r}")
                continue
            if target.lower().rstrip("/") == source.lower().rstrip("/"):
                self.problem(value, where, "a source cannot be its own restore-test target (a restore overwrites it)")
                continue
            if target.lower() in used:
                self.problem(value, where, f"{target} is already the target of {used[target.lower()]}")
                continue
            if target.lower().rstrip("/") in targets:
                self.problem(value, where, "a backup source cannot also be a restore-test target")
                continue
            used[target.lower()] = source
            targets[source.lower().rstrip("/")] = target.rstrip("/")
        for source in list(targets):
            if source in used:
                self.problem(
                    node, key, f"{source} is both a source and a target; a target is overwritten by every test"
                )
                del targets[source]

    def mode(self, node: yaml.Node, key: str, allowed: tuple[Mode, ...]) -> Mode | None:
        # The raw text, not the constructed value: YAML 1.1 reads a plain `off` as false.
        names = ", ".join(m.value for m in allowed)
        if isinstance(node, yaml.ScalarNode) and node.tag in (_STR, "tag:yaml.org,2002:bool"):
            for mode in allowed:
                if node.value == mode.value:
                    return mode
        self.problem(node, key, f"unknown mode {_raw(node)}; allowed: {names}")
        return None

    def defaults(self, node: yaml.Node) -> Mode:
        default_mode = Mode.DETECT
        for name, _, value in self.mapping(node, "defaults", ("mode",)):
            if name == "mode":
                if isinstance(value, yaml.ScalarNode) and value.value == Mode.REMEDIATE.value:
                    self.problem(
                        value,
                        "defaults.mode",
                        "remediate cannot be a default: opt each rule in under rules: "
                        "(e.g. TLS-001: {mode: remediate}); allowed here: off, detect",
                    )
                    continue
                default_mode = self.mode(value, "defaults.mode", (Mode.OFF, Mode.DETECT)) or Mode.DETECT
        return default_mode

    def rules(self, node: yaml.Node, modes: dict[str, Mode], overrides: dict[str, dict[str, ParamValue]]) -> None:
        for rule_id, key_node, value in self.mapping(node, "rules", None):
            key = f"rules.{rule_id}"
            known = REGISTRY.get(rule_id) or self.custom.get(rule_id)
            if known is None:
                self.problem(key_node, key, f"unknown rule id{_suggest(rule_id)}; known: {_known_ids()}")
                continue
            for name, _, item in self.mapping(value, key, _RULE_KEYS):
                if name == "mode":
                    mode = self.mode(item, f"{key}.mode", tuple(Mode))
                    if mode is Mode.REMEDIATE and not known.remediable:
                        self.problem(item, f"{key}.mode", f"rule {rule_id} has no remediation; use detect (or off)")
                    elif mode is not None:
                        modes[rule_id] = mode
                elif name == "params" and not _is_null(item):
                    overrides[rule_id] = self.params(known, item, f"{key}.params")

    def params(self, known: Rule, node: yaml.Node, key: str) -> dict[str, ParamValue]:
        declared = {p.name: p for p in known.params}
        allowed = ", ".join(declared) if declared else None
        values: dict[str, ParamValue] = {}
        for name, key_node, value in self.mapping(node, key, None):
            param = declared.get(name)
            if param is None:
                self.problem(
                    key_node,
                    f"{key}.{name}",
                    f"unknown parameter; allowed: {allowed}" if allowed else f"rule {known.id} takes no parameters",
                )
                continue
            converted = self.param(param, value, f"{key}.{name}")
            if converted is not None:
                values[name] = converted
        return values

    def param(self, param: Param, node: yaml.Node, key: str) -> ParamValue | None:
        expected = _expected(param)
        default = param.default
        if isinstance(default, tuple):
            items: list[str] = []
            bad = False
            if not isinstance(node, yaml.SequenceNode):
                self.problem(node, key, f"expected {expected}, got {_describe(node)}")
                return None
            for i, item in enumerate(node.value):
                if not (isinstance(item, yaml.ScalarNode) and item.tag == _STR):
                    self.problem(item, f"{key}[{i}]", f"expected a string, got {_describe(item)}")
                    bad = True
                elif param.choices and item.value not in param.choices:
                    self.problem(item, f"{key}[{i}]", f"expected one of {', '.join(param.choices)}, got {_raw(item)}")
                    bad = True
                elif param.format is not None and not param.format.accepts(item.value):
                    self.problem(item, f"{key}[{i}]", f"expected {param.format.description}, got {_raw(item)}")
                    bad = True
                else:
                    items.append(item.value)
            return None if bad else tuple(items)

        ok, value = self.scalar(node)
        converted: ParamValue | None = None
        if ok and isinstance(default, bool):
            converted = value if isinstance(value, bool) else None
        elif ok and isinstance(default, int):
            converted = value if isinstance(value, int) and not isinstance(value, bool) else None
        elif ok and isinstance(default, float):
            is_number = isinstance(value, int | float) and not isinstance(value, bool)
            converted = float(value) if is_number else None
        elif ok and isinstance(default, str):
            converted = value if isinstance(value, str) and node.tag == _STR else None
        if converted is None:
            quote = isinstance(default, str) and isinstance(node, yaml.ScalarNode) and node.tag != _NULL
            hint = " (YAML reads it as a non-string: quote it)" if quote else ""
            self.problem(node, key, f"expected {expected}, got {_raw(node)}{hint}")
            return None
        if isinstance(converted, str) and param.choices and converted not in param.choices:
            self.problem(node, key, f"expected {expected}, got {_raw(node)}")
            return None
        if isinstance(converted, int | float) and not isinstance(converted, bool):
            too_low = param.minimum is not None and converted < param.minimum
            too_high = param.maximum is not None and converted > param.maximum
            if too_low or too_high:
                self.problem(node, key, f"expected {expected}, got {_raw(node)}")
                return None
        if isinstance(converted, str) and param.format is not None and not param.format.accepts(converted):
            self.problem(node, key, f"expected {expected}, got {_raw(node)}")
            return None
        return converted

    def exemptions(self, node: yaml.Node) -> list[PolicyExemption]:
        if not isinstance(node, yaml.SequenceNode):
            self.problem(node, "exemptions", f"expected a list of exemptions, got {_describe(node)}")
            return []
        out: list[PolicyExemption] = []
        for i, item in enumerate(node.value):
            exemption = self.exemption(item, f"exemptions[{i}]")
            if exemption is not None:
                out.append(exemption)
        return out

    def exemption(self, node: yaml.Node, key: str) -> PolicyExemption | None:
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, key, f"expected a mapping with {', '.join(_EXEMPTION_KEYS)}, got {_describe(node)}")
            return None
        entries = {name: value for name, _, value in self.mapping(node, key, _EXEMPTION_KEYS)}
        missing = [k for k in _EXEMPTION_KEYS if k not in entries]
        for name in missing:
            hint = " (an exemption without an end is a permanent hole)" if name == "expires" else ""
            self.problem(node, f"{key}.{name}", f"is required{hint}")
        rule_id = resource = reason = None
        expires: date | None = None
        if "rule" in entries:
            rule_id = self.string(entries["rule"], f"{key}.rule", "a rule id or *")
            if rule_id is not None and rule_id != "*" and rule_id not in REGISTRY and rule_id not in self.custom:
                self.problem(
                    entries["rule"], f"{key}.rule", f"unknown rule id{_suggest(rule_id)}; known: *, {_known_ids()}"
                )
                rule_id = None
        if "resource" in entries:
            resource = self.string(entries["resource"], f"{key}.resource", "an ARM resource id or glob")
            if resource is not None and not resource.startswith(("/", "*")):
                self.problem(
                    entries["resource"],
                    f"{key}.resource",
                    f"expected an ARM resource id or glob starting with /subscriptions/ (or *), got {resource!r}",
                )
                resource = None
        if "reason" in entries:
            reason = self.string(entries["reason"], f"{key}.reason", "a non-empty reason (why, and a ticket)")
        if "expires" in entries:
            expires = self.expiry(entries["expires"], f"{key}.expires")
        if rule_id is None or resource is None or reason is None or expires is None:
            return None
        return PolicyExemption(rule_id, resource, reason, expires, node.start_mark.line + 1)

    def expiry(self, node: yaml.Node, key: str) -> date | None:
        ok, value = self.scalar(node)
        when: date | None = None
        if ok and isinstance(value, date) and not isinstance(value, datetime):
            when = value
        elif ok and isinstance(value, str):
            try:
                when = date.fromisoformat(value.strip())
            except ValueError:
                when = None
        if when is None:
            self.problem(node, key, f"expected a date like 2027-03-31, got {_raw(node)}")
            return None
        if when < self.today:
            self.problem(
                node, key, f"{when.isoformat()} is in the past (today is {self.today.isoformat()}); renew or remove it"
            )
            return None
        return when

    def scope(self, node: yaml.Node) -> Scope:
        subscriptions: list[str] = []
        groups: list[str] = []
        tags: list[tuple[str, str]] = []
        for name, _, value in self.mapping(node, "scope", _SCOPE_KEYS):
            key = f"scope.{name}"
            if name == "subscriptions":
                for i, (text, item) in enumerate(self.strings(value, key, "subscription ids (GUIDs)")):
                    if _GUID.fullmatch(text):
                        subscriptions.append(text.lower())
                    else:
                        self.problem(item, f"{key}[{i}]", f"expected a subscription id (a GUID), got {text!r}")
            elif name == "resource_groups":
                for i, (text, item) in enumerate(self.strings(value, key, "resource group names")):
                    if _RESOURCE_GROUP.fullmatch(text):
                        groups.append(text.lower())
                    else:
                        self.problem(item, f"{key}[{i}]", f"expected a resource group name, got {text!r}")
            elif name == "tags" and not _is_null(value):
                for tag, _, tag_value in self.mapping(value, key, None):
                    # Tag values are text in Azure: take the YAML text as written (`true` stays "true").
                    if isinstance(tag_value, yaml.ScalarNode) and tag_value.tag != _NULL:
                        tags.append((tag, str(tag_value.value)))
                    else:
                        self.problem(
                            tag_value, f"{key}.{tag}", f"expected a tag value (text), got {_describe(tag_value)}"
                        )
        return Scope(tuple(subscriptions), tuple(groups), tuple(tags))

    def limits(self, node: yaml.Node) -> int:
        max_writes = DEFAULT_MAX_WRITES_PER_RUN
        for name, _, value in self.mapping(node, "limits", _LIMIT_KEYS):
            if name == "max_writes_per_run":
                ok, number = self.scalar(value)
                if ok and isinstance(number, int) and not isinstance(number, bool) and number >= 0:
                    max_writes = number
                else:
                    self.problem(value, "limits.max_writes_per_run", f"expected an integer >= 0, got {_raw(value)}")
        return max_writes


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == _NULL


def _raw(node: yaml.Node) -> str:
    if isinstance(node, yaml.ScalarNode):
        return repr(node.value) if node.tag == _STR else str(node.value or "null")
    return _describe(node)


def _describe(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if isinstance(node, yaml.ScalarNode):
        return "nothing" if node.tag == _NULL else _raw(node)
    return "something else"


def _expected(param: Param) -> str:
    """What a parameter accepts, in words: "an integer >= 1", "one of a, b", ..."""
    default = param.default
    if isinstance(default, tuple):
        if param.choices:
            return f"a list of strings from {', '.join(param.choices)}"
        return f"a list of {param.format.description}" if param.format is not None else "a list of strings"
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, str):
        if param.choices:
            return f"one of {', '.join(param.choices)}"
        return param.format.description if param.format is not None else "a string"
    what = "an integer" if isinstance(default, int) else "a number"
    if param.minimum is not None:
        what += f" >= {_number(param.minimum)}"
    if param.maximum is not None:
        what += f"{' and' if param.minimum is not None else ''} <= {_number(param.maximum)}"
    return what


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
