#!/bin/sh
# azd postdeploy hook: wire Event Grid to the deployed `events` function (infra/events.bicep).
# azd exports main.bicep's outputs as environment values; APIMR_APIM_EVENT_SERVICES may hold a
# JSON array [{"id": ..., "location": ...}] of APIM instances whose own events should arrive.
set -eu
: "${AZURE_LOCATION:?run through azd (azd up / azd deploy), which sets main.bicep outputs}"
: "${FUNCTION_APP_ID:?}" "${SCOPE_SUBSCRIPTION_IDS:?}" "${AZURE_RESOURCE_GROUP:?}" "${KEY_VAULT_NAME:?}"
az deployment sub create \
  --name "apimr-events-${AZURE_ENV_NAME:-default}" \
  --location "$AZURE_LOCATION" \
  --template-file infra/events.bicep \
  --parameters \
    location="$AZURE_LOCATION" \
    functionAppId="$FUNCTION_APP_ID" \
    scopeSubscriptionIds="$SCOPE_SUBSCRIPTION_IDS" \
    appResourceGroupName="$AZURE_RESOURCE_GROUP" \
    keyVaultName="$KEY_VAULT_NAME" \
    apimServices="${APIMR_APIM_EVENT_SERVICES:-[]}" \
    tags="{\"azd-env-name\": \"${AZURE_ENV_NAME:-}\"}" \
  --output none
echo "Event Grid wired to $FUNCTION_APP_ID/functions/events"
