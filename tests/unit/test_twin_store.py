"""The twin's ARM store answers lists from its indexes exactly as a walk of every resource
would (children in insertion order, subtrees, types), through puts, deletes and resets."""

from __future__ import annotations

import copy
import random

from twin.state import ArmStore, norm

SERVICE = "/subscriptions/S1/resourceGroups/RG/providers/Microsoft.ApiManagement/service/{n}"


def _walk_children(store: ArmStore, parent: str, child_type: str) -> list[str]:
    prefix = norm(parent) + "/" + child_type.lower() + "/"
    return [r.id for k, r in store.resources.items() if k.startswith(prefix) and "/" not in k[len(prefix) :]]


def _walk_descendants(store: ArmStore, parent: str) -> list[str]:
    prefix = norm(parent) + "/"
    return sorted(k for k in store.resources if k.startswith(prefix))


def _populate(store: ArmStore, rng: random.Random) -> list[str]:
    ids = []
    for n in range(6):
        service = SERVICE.format(n=f"apim-{n}")
        ids.append(service)
        store.put(service, {"type": "Microsoft.ApiManagement/service"})
        for a in range(rng.randint(0, 4)):
            api = f"{service}/apis/API-{a}"
            store.put(api, {"type": "Microsoft.ApiManagement/service/apis"})
            store.put(f"{api}/operations/op", {"type": "Microsoft.ApiManagement/service/apis/operations"})
            ids.append(api)
        for s in range(rng.randint(0, 3)):
            store.put(f"{service}/subscriptions/s{s}", {"type": "Microsoft.ApiManagement/service/subscriptions"})
        store.put(
            f"{service}/providers/Microsoft.Insights/diagnosticSettings/d",
            {"type": "Microsoft.Insights/diagnosticSettings"},
        )
    # A service whose name extends another's must not count as its child.
    store.put(SERVICE.format(n="apim-1x"), {"type": "Microsoft.ApiManagement/service"})
    return ids


def _check(store: ArmStore) -> None:
    for n in ("apim-0", "apim-1", "apim-1x", "apim-5", "missing"):
        service = SERVICE.format(n=n)
        for kind in ("apis", "subscriptions", "APIS"):
            assert [r.id for r in store.children(service, kind)] == _walk_children(store, service, kind)
        assert [norm(r.id) for r in store.descendants(service)] == _walk_descendants(store, service)
        insights = f"{service}/providers/Microsoft.Insights"
        assert [r.id for r in store.children(insights, "diagnosticSettings")] == _walk_children(
            store, insights, "diagnosticSettings"
        )
    services = [r.id for r in store.resources.values() if r.body["type"] == "Microsoft.ApiManagement/service"]
    assert [r.id for r in store.by_type("microsoft.apimanagement/service")] == services


def test_indexes_agree_with_a_walk_through_puts_deletes_and_load() -> None:
    rng = random.Random(14)
    store = ArmStore()
    ids = _populate(store, rng)
    _check(store)
    seeded = copy.deepcopy(store.resources)
    for victim in rng.sample(ids, 5):
        store.delete(victim)
        _check(store)
        assert store.get(victim) is None
        assert store.descendants(victim) == []
    store.put(SERVICE.format(n="apim-0") + "/apis/late", {"type": "Microsoft.ApiManagement/service/apis"})
    _check(store)
    store.load(copy.deepcopy(seeded))
    _check(store)
    assert len(store.descendants("/subscriptions/s1")) == len(seeded)


def test_a_put_that_changes_the_type_moves_the_resource_between_type_lists() -> None:
    store = ArmStore()
    store.put("/subscriptions/s/x", {"type": "a"})
    store.put("/subscriptions/s/x", {"type": "b"})
    assert store.by_type("a") == []
    assert [r.id for r in store.by_type("B")] == ["/subscriptions/s/x"]
