"""Resource Graph in the twin, driven by the real azure-mgmt-resourcegraph client (sync and
async): the product's APIM discovery query, paging, and refusal of what the twin's small
query parser does not support (a 400 naming the part, never a silent empty result)."""

from __future__ import annotations

from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError
from azure.mgmt.resourcegraph import ResourceGraphClient
from azure.mgmt.resourcegraph.aio import ResourceGraphClient as AsyncResourceGraphClient
from azure.mgmt.resourcegraph.models import QueryRequest, QueryRequestOptions

from tests.conftest import TwinHandle

pytestmark = pytest.mark.integration

PROD = "3f2a1b0c-0000-4000-8000-000000000101"
DEV = "3f2a1b0c-0000-4000-8000-000000000202"
APIM = "Microsoft.ApiManagement/service"
FIND_APIM = "resources | where type =~ 'microsoft.apimanagement/service'"
PROJECTION = "| project id, name, resourceGroup, subscriptionId, location, tags, properties, sku, identity"


def apim(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": APIM, "properties": {"gatewayUrl": f"https://{name}.azure-api.net"}, **extra}


@pytest.fixture
def seeded(twin: TwinHandle) -> TwinHandle:
    twin.seed(
        {
            "subscriptions": [
                {
                    "id": PROD,
                    "resource_groups": [
                        {
                            "name": "rg-apim-prod",
                            "location": "westeurope",
                            "graph_resources": [
                                apim(
                                    "apim-prod-a",
                                    tags={"env": "prod", "owner": "team-a"},
                                    sku={"name": "Premium", "capacity": 1},
                                ),
                                apim("apim-prod-b", tags={"env": "Prod"}),
                                apim("apim-prod-c", location="West Europe"),
                                {"name": "kv-prod", "type": "Microsoft.KeyVault/vaults"},
                            ],
                        },
                        {
                            "name": "rg-monitoring",
                            "location": "westeurope",
                            "graph_resources": [apim("apim-shared", tags={"env": "prod"})],
                        },
                    ],
                },
                {
                    "id": DEV,
                    "resource_groups": [
                        {"name": "rg-apim-dev", "location": "northeurope", "graph_resources": [apim("apim-dev")]}
                    ],
                },
            ]
        }
    )
    return twin


def client(twin: TwinHandle) -> ResourceGraphClient:
    return ResourceGraphClient(
        twin.credential(),
        base_url=twin.urls["arm"],
        credential_scopes=[twin.urls["arm"] + "/.default"],
        **twin.sdk_kwargs,
    )


def query(twin: TwinHandle, text: str, subscriptions: list[str], **options: Any) -> Any:
    return client(twin).resources(
        QueryRequest(query=text, subscriptions=subscriptions, options=QueryRequestOptions(**options))
    )


def names(data: Any) -> list[str]:
    assert isinstance(data, list)
    return sorted(str(row["name"]) for row in data)


def test_apim_discovery_returns_exactly_the_services_of_the_requested_subscriptions(seeded: TwinHandle) -> None:
    result = query(seeded, FIND_APIM + " " + PROJECTION, [PROD])
    assert names(result.data) == ["apim-prod-a", "apim-prod-b", "apim-prod-c", "apim-shared"]
    assert result.total_records == 4
    assert result.count == 4
    assert result.result_truncated == "false"
    assert result.skip_token is None
    assert result.facets == []
    row = next(r for r in result.data if r["name"] == "apim-prod-a")
    assert list(row) == [
        "id",
        "name",
        "resourceGroup",
        "subscriptionId",
        "location",
        "tags",
        "properties",
        "sku",
        "identity",
    ]
    assert row["id"] == f"/subscriptions/{PROD}/resourceGroups/rg-apim-prod/providers/{APIM}/apim-prod-a"
    assert row["resourceGroup"] == "rg-apim-prod"
    assert row["subscriptionId"] == PROD
    assert row["tags"] == {"env": "prod", "owner": "team-a"}
    assert row["sku"] == {"name": "Premium", "capacity": 1}
    assert row["properties"]["gatewayUrl"] == "https://apim-prod-a.azure-api.net"
    # Resource Graph normalises location (lowercase, no spaces).
    assert next(r for r in result.data if r["name"] == "apim-prod-c")["location"] == "westeurope"

    both = query(seeded, FIND_APIM, [PROD, DEV])
    assert names(both.data) == ["apim-dev", "apim-prod-a", "apim-prod-b", "apim-prod-c", "apim-shared"]
    assert both.data[0]["type"] == "microsoft.apimanagement/service"
    assert query(seeded, FIND_APIM, [DEV]).total_records == 1


def test_filters_on_subscription_group_and_tags(seeded: TwinHandle) -> None:
    both = [PROD, DEV]
    in_sub = query(seeded, f"{FIND_APIM} | where subscriptionId in ('{DEV}')", both)
    assert names(in_sub.data) == ["apim-dev"]
    groups = query(seeded, f"{FIND_APIM} | where resourceGroup in~ ('RG-APIM-PROD', 'rg-apim-dev')", both)
    assert names(groups.data) == ["apim-dev", "apim-prod-a", "apim-prod-b", "apim-prod-c"]
    # `in` is case-sensitive: the upper-case group does not match.
    assert names(query(seeded, f"{FIND_APIM} | where resourceGroup in ('RG-APIM-PROD')", both).data) == []
    tag_ci = query(seeded, f"{FIND_APIM} | where tags['env'] =~ 'prod'", both)
    assert names(tag_ci.data) == ["apim-prod-a", "apim-prod-b", "apim-shared"]
    tag_cs = query(seeded, f"{FIND_APIM} | where tags.env == 'prod' and name != 'apim-shared'", both)
    assert names(tag_cs.data) == ["apim-prod-a"]
    # Resource Graph lower-cases `type`: an exact-case comparison finds nothing.
    assert query(seeded, f"resources | where type == '{APIM}'", both).total_records == 0


def test_paging_with_top_and_skip_token(seeded: TwinHandle) -> None:
    text = FIND_APIM + " | project id, name"
    first = query(seeded, text, [PROD, DEV], top=2)
    assert first.count == 2
    assert first.total_records == 5
    assert first.skip_token
    second = query(seeded, text, [PROD, DEV], skip_token=first.skip_token)
    assert second.count == 2
    third = query(seeded, text, [PROD, DEV], skip_token=second.skip_token)
    assert third.count == 1
    assert third.skip_token is None
    seen = [r["name"] for page in (first, second, third) for r in page.data]
    assert sorted(seen) == ["apim-dev", "apim-prod-a", "apim-prod-b", "apim-prod-c", "apim-shared"]
    assert len(set(seen)) == 5
    skipped = query(seeded, text, [PROD, DEV], skip=4)
    assert skipped.count == 1
    # A token belongs to its query and scopes.
    with pytest.raises(HttpResponseError) as raised:
        query(seeded, text, [PROD], skip_token=first.skip_token)
    assert raised.value.status_code == 400


def test_without_an_id_column_the_result_is_truncated_not_paged(seeded: TwinHandle) -> None:
    result = query(seeded, FIND_APIM + " | project name", [PROD, DEV], top=2)
    assert result.count == 2
    assert result.skip_token is None
    assert result.result_truncated == "true"


def test_table_result_format(seeded: TwinHandle) -> None:
    result = query(seeded, FIND_APIM + " | project id, name, tags", [DEV], result_format="table")
    assert [c["name"] for c in result.data["columns"]] == ["id", "name", "tags"]
    assert result.data["rows"][0][1] == "apim-dev"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (FIND_APIM + " | summarize count()", "summarize"),
        ("securityresources | where type =~ 'x'", "securityresources"),
        (FIND_APIM + " | where resourcegroup == 'rg-apim-prod'", "resourcegroup"),
        (FIND_APIM + " | where name contains 'prod'", "contains"),
        (FIND_APIM + " | where name == 'a' or name == 'b'", "or"),
        (FIND_APIM + " | project id, name, publisherEmail", "publisherEmail"),
        (FIND_APIM + " | where tags['env'] == prod", "prod"),
        (FIND_APIM + " | project id | where name == 'x'", "where"),
    ],
)
def test_unsupported_queries_are_refused_naming_the_part(seeded: TwinHandle, text: str, named: str) -> None:
    with pytest.raises(HttpResponseError) as raised:
        query(seeded, text, [PROD])
    assert raised.value.status_code == 400
    assert raised.value.error is not None
    assert raised.value.error.code == "BadRequest"
    assert named in str(raised.value.error.message)


async def test_async_client(seeded: TwinHandle) -> None:
    credential = seeded.async_credential()
    async with (
        credential,
        AsyncResourceGraphClient(
            credential,
            base_url=seeded.urls["arm"],
            credential_scopes=[seeded.urls["arm"] + "/.default"],
            **seeded.sdk_kwargs,
        ) as graph,
    ):
        result = await graph.resources(QueryRequest(query=FIND_APIM + " " + PROJECTION, subscriptions=[DEV]))
        assert names(result.data) == ["apim-dev"]
        with pytest.raises(HttpResponseError) as raised:
            await graph.resources(QueryRequest(query="resources | take 5", subscriptions=[DEV]))
        assert raised.value.status_code == 400


def test_raw_wire_shape_options_and_quota_headers(seeded: TwinHandle) -> None:
    path = "/providers/Microsoft.ResourceGraph/resources?api-version=2021-03-01"
    response = seeded.arm("POST", path, json={"subscriptions": [DEV], "query": FIND_APIM})
    assert response.status_code == 200
    assert int(response.headers["x-ms-user-quota-remaining"]) < 15
    assert response.headers["x-ms-user-quota-resets-after"].startswith("00:00:0")
    body = response.json()
    assert set(body) == {"totalRecords", "count", "resultTruncated", "data", "facets"}
    for bad_options in ({"$top": 0}, {"$top": 1001}, {"$skip": -1}, {"resultFormat": "csv"}, {"$orderby": "name"}):
        bad = seeded.arm("POST", path, json={"subscriptions": [DEV], "query": FIND_APIM, "options": bad_options})
        assert bad.status_code == 400, bad_options
    missing = seeded.arm("POST", path, json={"subscriptions": [DEV]})
    assert missing.status_code == 400
    # A version the provider does not serve: ARM's NoRegisteredProviderFound (Azure/azure-cli#28496).
    unserved = seeded.arm("POST", path.replace("2021-03-01", "2020-01-01"), json={"query": FIND_APIM})
    assert (unserved.status_code, unserved.json()["error"]["code"]) == (400, "NoRegisteredProviderFound")


def test_quota_is_enforced_when_throttling_is_on(seeded: TwinHandle) -> None:
    status, _ = seeded.control("PUT", "/_twin/throttle", json={"enabled": True})
    assert status == 200
    path = "/providers/Microsoft.ResourceGraph/resources?api-version=2021-03-01"
    token = seeded.credential().get_token(seeded.urls["arm"] + "/.default").token
    statuses = [
        seeded.arm("POST", path, token=token, json={"subscriptions": [DEV], "query": FIND_APIM}).status_code
        for _ in range(16)
    ]
    assert statuses[:15] == [200] * 15
    assert statuses[15] == 429


def test_services_seeded_by_the_apim_section_are_found(twin: TwinHandle) -> None:
    twin.seed(
        {
            "subscriptions": [
                {
                    "id": DEV,
                    "resource_groups": [
                        {"name": "rg-apim-dev", "apim": [{"name": "apim-real-dev", "tags": {"env": "dev"}}]}
                    ],
                }
            ]
        }
    )
    result = query(twin, f"{FIND_APIM} | where tags.env == 'dev' {PROJECTION}", [DEV])
    assert names(result.data) == ["apim-real-dev"]
    row = result.data[0]
    assert row["properties"]["publisherEmail"]
    assert row["sku"]["name"]
    # Child resources (APIM subscriptions, APIs, ...) are not rows of the resources table.
    everything = query(twin, "resources", [DEV])
    assert everything.total_records >= 1
    assert all(str(r["type"]).count("/") == 1 for r in everything.data)


def test_resourcecontainers_lists_the_visible_subscriptions_and_groups(seeded: TwinHandle) -> None:
    unknown = "3f2a1b0c-0000-4000-8000-0000000009ff"  # not in the twin: like a subscription the caller cannot read
    text = "resourcecontainers | where type =~ 'microsoft.resources/subscriptions' | project id, name, subscriptionId"
    result = query(seeded, text, [PROD, unknown])
    assert result.data == [{"id": f"/subscriptions/{PROD}", "name": "platform-prod", "subscriptionId": PROD}]
    groups = query(
        seeded,
        "ResourceContainers | where type =~ 'microsoft.resources/subscriptions/resourcegroups' "
        "| project id, resourceGroup, location, subscriptionId",
        [DEV],
    )
    assert groups.data == [
        {
            "id": f"/subscriptions/{DEV}/resourceGroups/rg-apim-dev",
            "resourceGroup": "rg-apim-dev",
            "location": "northeurope",
            "subscriptionId": DEV,
        }
    ]
    # The resources table does not hold containers, and containers hold no resources.
    assert query(seeded, "resources | where type =~ 'microsoft.resources/subscriptions'", [PROD]).data == []
    assert query(seeded, "resourcecontainers | where type =~ 'microsoft.apimanagement/service'", [PROD]).data == []
