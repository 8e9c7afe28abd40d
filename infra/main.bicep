// apim-remediator, the whole deployment: `azd up` (azure.yaml) or
//   az deployment sub create -l <region> -f infra/main.bicep -p environmentName=<name> location=<region>
// Creates the resource group and the app's own resources (modules/app.bicep), and in every
// subscription in scope the product's custom role and its assignment to the app's identity
// (subscription-role.bicep: the same file the twin loads for the run-under-the-role tests, so
// what is deployed is what was proven). Event Grid is wired after the code is deployed
// (events.bicep, azure.yaml's postdeploy hook): Event Grid validates a function destination
// when the subscription is created, and the function exists only then.
targetScope = 'subscription'

@minLength(1)
@maxLength(40)
@description('azd environment name: names the resource group and tags every resource.')
param environmentName string

@minLength(1)
@description('Region for the app and its resources.')
param location string

@description('Resource group of the app; default rg-<environmentName>.')
param resourceGroupName string = 'rg-${environmentName}'

@description('Short name prefix for resources (3-11 lowercase letters and digits).')
@minLength(3)
@maxLength(11)
param prefix string = 'apimrem'

@description('Subscriptions the remediator watches and may act on (APIMR_SUBSCRIPTION_IDS); default: this one.')
param scopeSubscriptionIds array = [subscription().subscriptionId]

@description('Grant the write actions remediation needs; false (the default) deploys a detect-only identity.')
param allowRemediation bool = false

@description('Comma-separated resource groups to look in (APIMR_RESOURCE_GROUPS); empty: all.')
param resourceGroups string = ''

@description('name=value,... tags an APIM instance must carry to be in scope (APIMR_TAG_SELECTOR).')
param tagSelector string = ''

@description('Policy file inside the deployed package (APIMR_POLICY_FILE); empty: the shipped baseline (every rule detect).')
param policyFile string = ''

@description('When the sweep fans out: six-field NCRONTAB, seconds first (APIMR_SWEEP_SCHEDULE).')
param sweepSchedule string = '0 0 */6 * * *'

@description('The HTTP API\'s token audience (APIMR_API_AUDIENCE), e.g. api://apim-remediator; empty: the API refuses every request.')
param apiAudience string = ''

@description('The Entra tenant whose tokens the HTTP API accepts (APIMR_API_TENANT_ID).')
param apiTenantId string = tenant().tenantId

@allowed(['DEBUG', 'INFO', 'WARNING', 'ERROR'])
param logLevel string = 'INFO'

@description('Log Analytics workspaces (resource ids) the runtime rules query outside the subscriptions in scope: Log Analytics Reader there. Inside them the custom role already grants the query.')
param logAnalyticsWorkspaceIds array = []

@description('Workspace (resource id) with Microsoft Sentinel where incidents are raised (APIMR_INCIDENT_SENTINEL_WORKSPACE): Microsoft Sentinel Responder there. Empty: no Sentinel sink.')
param sentinelWorkspaceId string = ''

@secure()
@description('Webhook incidents are posted to (APIMR_INCIDENT_WEBHOOK_URL); empty: none.')
param incidentWebhookUrl string = ''

@allowed(['json', 'teams', 'slack'])
param incidentWebhookFormat string = 'json'

@description('Secret in the ledger vault holding the json webhook\'s HMAC key (APIMR_INCIDENT_WEBHOOK_SECRET_NAME).')
param incidentWebhookSecretName string = ''

var tags = { 'azd-env-name': environmentName }
var logAnalyticsReader = '73c42c96-874c-492b-b04d-ab87d138a893'

resource group 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: resourceGroupName
  location: location
  tags: tags
}

module app 'modules/app.bicep' = {
  name: 'apimr-app'
  scope: group
  params: {
    location: location
    tags: tags
    prefix: prefix
    subscriptionIds: join(scopeSubscriptionIds, ',')
    resourceGroups: resourceGroups
    tagSelector: tagSelector
    policyFile: policyFile
    sweepSchedule: sweepSchedule
    apiAudience: apiAudience
    apiTenantId: apiTenantId
    logLevel: logLevel
    sentinelWorkspaceId: sentinelWorkspaceId
    incidentWebhookUrl: incidentWebhookUrl
    incidentWebhookFormat: incidentWebhookFormat
    incidentWebhookSecretName: incidentWebhookSecretName
  }
}

// The custom role, one definition and one assignment per subscription in scope.
module scopeRoles 'subscription-role.bicep' = [
  for sub in scopeSubscriptionIds: {
    name: 'apimr-role-${uniqueString(sub, environmentName)}'
    scope: subscription(sub)
    params: {
      principalId: app.outputs.identityPrincipalId
      allowRemediation: allowRemediation
    }
  }
]

module workspaceReaders 'modules/workspace-role.bicep' = [
  for id in logAnalyticsWorkspaceIds: {
    name: 'apimr-logs-${uniqueString(id, environmentName)}'
    scope: resourceGroup(split(id, '/')[2], split(id, '/')[4])
    params: {
      workspaceName: last(split(id, '/'))
      roleId: logAnalyticsReader
      principalId: app.outputs.identityPrincipalId
    }
  }
]

// The same file an operator deploys by hand for a workspace added later.
module sentinel 'sentinel-role.bicep' = if (!empty(sentinelWorkspaceId)) {
  name: 'apimr-sentinel-${uniqueString(sentinelWorkspaceId, environmentName)}'
  scope: resourceGroup(split(sentinelWorkspaceId, '/')[2], split(sentinelWorkspaceId, '/')[4])
  params: {
    workspaceName: last(split(sentinelWorkspaceId, '/'))
    principalId: app.outputs.identityPrincipalId
  }
}

// azd turns outputs into environment values (the postdeploy hook reads them).
output AZURE_LOCATION string = location
output AZURE_RESOURCE_GROUP string = group.name
output FUNCTION_APP_ID string = app.outputs.functionAppId
output FUNCTION_APP_NAME string = app.outputs.functionAppName
output IDENTITY_PRINCIPAL_ID string = app.outputs.identityPrincipalId
output KEY_VAULT_NAME string = app.outputs.keyVaultName
output KEY_VAULT_URI string = app.outputs.keyVaultUri
output STORAGE_ACCOUNT_NAME string = app.outputs.storageAccountName
output SCOPE_SUBSCRIPTION_IDS string = join(scopeSubscriptionIds, ',')
