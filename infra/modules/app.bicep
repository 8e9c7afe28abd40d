// The remediator's own resources in its resource group: a user-assigned identity, storage
// (identity only), Log Analytics + Application Insights, the key-ledger Key Vault (RBAC mode),
// a Flex Consumption Function App, and the data-plane roles the identity needs on them.
// Its rights on the APIM instances come from ../subscription-role.bicep (main.bicep deploys it
// per subscription in scope).
targetScope = 'resourceGroup'

@description('Region for every resource.')
param location string

@description('Tags for every resource (azd-env-name).')
param tags object

@description('Short name prefix (3-11 lowercase letters and digits).')
@minLength(3)
@maxLength(11)
param prefix string

@description('Comma-separated subscription ids in scope (APIMR_SUBSCRIPTION_IDS).')
param subscriptionIds string

@description('Comma-separated resource groups to look in (APIMR_RESOURCE_GROUPS); empty: all.')
param resourceGroups string

@description('name=value,... tags an instance must carry (APIMR_TAG_SELECTOR); empty: any.')
param tagSelector string

@description('The policy file inside the deployed package (APIMR_POLICY_FILE); empty: the shipped baseline, every rule in detect mode.')
param policyFile string

@description('When the sweep fans out: six-field NCRONTAB, seconds first (APIMR_SWEEP_SCHEDULE).')
param sweepSchedule string

@description('The HTTP API\'s token audience (APIMR_API_AUDIENCE); empty: the API refuses every request.')
param apiAudience string

@description('The Entra tenant whose tokens the HTTP API accepts (APIMR_API_TENANT_ID).')
param apiTenantId string

@description('Log level of the product\'s own loggers (APIMR_LOG_LEVEL).')
@allowed(['DEBUG', 'INFO', 'WARNING', 'ERROR'])
param logLevel string

@description('Sentinel workspace resource id for incidents (APIMR_INCIDENT_SENTINEL_WORKSPACE); empty: none.')
param sentinelWorkspaceId string

@secure()
@description('Incident webhook URL (APIMR_INCIDENT_WEBHOOK_URL); empty: none.')
param incidentWebhookUrl string

@description('json, teams or slack (APIMR_INCIDENT_WEBHOOK_FORMAT).')
param incidentWebhookFormat string

@description('Ledger-vault secret holding the json webhook\'s HMAC key (APIMR_INCIDENT_WEBHOOK_SECRET_NAME).')
param incidentWebhookSecretName string

var suffix = uniqueString(resourceGroup().id)
var storageName = take('${prefix}${suffix}', 24)
var workQueue = 'apimr-work'
var packageContainer = 'app-package'
var backupContainer = 'apim-backups'

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: '${prefix}-id-${suffix}'
  location: location
  tags: tags
}

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  // checkov:skip=CKV_AZURE_35:The Flex Consumption app reaches its storage over the public endpoint; a VNet-integrated variant needs a subnet this template does not own. Shared keys are off, so the endpoint takes Entra tokens only.
  // checkov:skip=CKV_AZURE_206:LRS is the Functions default for the app's queue and journal; choose a GRS SKU (sku.name) if the APIM backups kept here must survive a regional outage.
  // checkov:skip=CKV_AZURE_43:False positive: the name is take(prefix + uniqueString(), 24), lowercase letters and digits by construction; checkov cannot evaluate the expression.
  name: storageName
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: { name: 'Standard_LRS' }
  properties: {
    minimumTlsVersion: 'TLS1_2'
    allowBlobPublicAccess: false
    // Identity only: no account keys, no connection strings.
    allowSharedKeyAccess: false
    supportsHttpsTrafficOnly: true
    defaultToOAuthAuthentication: true
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
  properties: {
    deleteRetentionPolicy: { enabled: true, days: 7 }
    containerDeleteRetentionPolicy: { enabled: true, days: 7 }
  }
}

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: packageContainer
  properties: { publicAccess: 'None' }
}

// Native APIM backups land here; each instance's own identity needs Storage Blob Data
// Contributor on it (the backup job says which instance lacks it).
resource backups 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: backupContainer
  properties: { publicAccess: 'None' }
}

resource logs 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: '${prefix}-logs-${suffix}'
  location: location
  tags: tags
  properties: {
    sku: { name: 'PerGB2018' }
    retentionInDays: 30
  }
}

resource insights 'Microsoft.Insights/components@2020-02-02' = {
  name: '${prefix}-ai-${suffix}'
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: logs.id
    DisableLocalAuth: true
  }
}

// The key ledger: one secret per tracked APIM subscription. RBAC mode, soft delete and purge
// protection, so neither a mistake nor an attacker with the identity can destroy a key history.
resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  // checkov:skip=CKV_AZURE_189:The app reaches the vault over its public endpoint (no VNet here); access is by Entra RBAC only, and the firewall can be tightened with a private endpoint later.
  // checkov:skip=CKV_AZURE_109:Same: the firewall default is Allow because the Flex Consumption app has no fixed egress address without VNet integration.
  name: take('${prefix}kv${suffix}', 24)
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: { family: 'A', name: 'standard' }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 90
    enablePurgeProtection: true
    publicNetworkAccess: 'Enabled'
    networkAcls: { bypass: 'AzureServices', defaultAction: 'Allow' }
  }
}

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  // checkov:skip=CKV_AZURE_225:Flex Consumption (FC1) has no zone-redundancy setting on the plan; the platform spreads instances.
  name: '${prefix}-plan-${suffix}'
  location: location
  tags: tags
  kind: 'functionapp'
  sku: { tier: 'FlexConsumption', name: 'FC1' }
  properties: { reserved: true }
}

resource app 'Microsoft.Web/sites@2024-04-01' = {
  // checkov:skip=CKV_AZURE_67:Flex Consumption serves HTTP/2 by the platform; http20Enabled is not a Flex setting.
  // checkov:skip=CKV_AZURE_18:Same as CKV_AZURE_67.
  // checkov:skip=CKV_AZURE_222:The HTTP API is reached over the app's public endpoint; every route but /api/health demands an Entra token (handlers/api.py).
  // checkov:skip=CKV_AZURE_17:The HTTP API authenticates Entra bearer tokens and Event Grid delivers through its AzureFunction destination; required client certificates would refuse both.
  // checkov:skip=CKV_AZURE_212:Flex Consumption scales out on demand (maximumInstanceCount below); a fixed instance minimum does not apply.
  // checkov:skip=CKV_AZURE_213:The `health` function answers /api/health, but Flex Consumption has no healthCheckPath setting.
  name: '${prefix}-func-${suffix}'
  location: location
  tags: union(tags, { 'azd-service-name': 'app' })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: { '${identity.id}': {} }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    clientCertEnabled: false
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${packageContainer}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identity.id
          }
        }
      }
      runtime: { name: 'python', version: '3.11' }
      scaleAndConcurrency: { maximumInstanceCount: 40, instanceMemoryMB: 2048 }
    }
    siteConfig: {
      minTlsVersion: '1.2'
      ftpsState: 'Disabled'
      // Every setting shared/settings.py reads (APIMR_*), nothing else of ours; a test keeps this
      // list, local.settings.sample.json and the README table in agreement.
      appSettings: [
        { name: 'AzureWebJobsStorage__accountName', value: storage.name }
        { name: 'AzureWebJobsStorage__credential', value: 'managedidentity' }
        { name: 'AzureWebJobsStorage__clientId', value: identity.properties.clientId }
        { name: 'APPLICATIONINSIGHTS_AUTHENTICATION_STRING', value: 'ClientId=${identity.properties.clientId};Authorization=AAD' }
        { name: 'APPLICATIONINSIGHTS_CONNECTION_STRING', value: insights.properties.ConnectionString }
        { name: 'APIMR_CLOUD', value: 'AzureCloud' }
        // Custom clouds only (private clouds, the local twin); empty in Azure's public clouds.
        { name: 'APIMR_ARM_ENDPOINT', value: '' }
        { name: 'APIMR_ARM_AUDIENCE', value: '' }
        { name: 'APIMR_AUTHORITY_HOST', value: '' }
        { name: 'APIMR_LOG_ANALYTICS_ENDPOINT', value: '' }
        { name: 'APIMR_RESOURCE_GRAPH_ENDPOINT', value: '' }
        { name: 'APIMR_KEYVAULT_VERIFY_CHALLENGE_RESOURCE', value: '' }
        { name: 'APIMR_STORAGE_ENDPOINT_SUFFIX', value: '' }
        { name: 'APIMR_SUBSCRIPTION_IDS', value: subscriptionIds }
        { name: 'APIMR_STORAGE_ACCOUNT', value: storage.name }
        // The account above, by identity: explicit endpoints and a connection string stay unset.
        { name: 'APIMR_STORAGE_BLOB_ENDPOINT', value: '' }
        { name: 'APIMR_STORAGE_QUEUE_ENDPOINT', value: '' }
        { name: 'APIMR_STORAGE_TABLE_ENDPOINT', value: '' }
        { name: 'APIMR_STORAGE_CONNECTION_STRING', value: '' }
        { name: 'APIMR_RETRY_TOTAL', value: '5' }
        { name: 'APIMR_RETRY_BACKOFF_FACTOR', value: '0.8' }
        { name: 'APIMR_RETRY_BACKOFF_MAX', value: '60' }
        { name: 'APIMR_RESOURCE_GROUPS', value: resourceGroups }
        { name: 'APIMR_TAG_SELECTOR', value: tagSelector }
        { name: 'APIMR_KEY_VAULT_URL', value: vault.properties.vaultUri }
        { name: 'APIMR_POLICY_FILE', value: policyFile }
        { name: 'APIMR_LEASE_SECONDS', value: '30' }
        { name: 'APIMR_MANAGED_IDENTITY_CLIENT_ID', value: identity.properties.clientId }
        { name: 'APIMR_CA_BUNDLE', value: '' }
        { name: 'APIMR_LOG_LEVEL', value: logLevel }
        // The host resolves %APIMR_SWEEP_SCHEDULE% and %APIMR_WORK_QUEUE% in the bindings itself
        // and will not start those functions without them.
        { name: 'APIMR_SWEEP_SCHEDULE', value: sweepSchedule }
        { name: 'APIMR_WORK_QUEUE', value: workQueue }
        // Runtime signals (Log Analytics queries) run at most this often per instance; 0: never.
        { name: 'APIMR_SIGNALS_INTERVAL_MINUTES', value: '15' }
        // Incidents: always a structured log event; Sentinel and a webhook when named.
        { name: 'APIMR_INCIDENT_SENTINEL_WORKSPACE', value: sentinelWorkspaceId }
        { name: 'APIMR_INCIDENT_WEBHOOK_URL', value: incidentWebhookUrl }
        { name: 'APIMR_INCIDENT_WEBHOOK_FORMAT', value: incidentWebhookFormat }
        { name: 'APIMR_INCIDENT_WEBHOOK_SECRET_NAME', value: incidentWebhookSecretName }
        { name: 'APIMR_INCIDENT_WEBHOOK_TIMEOUT', value: '10' }
        { name: 'APIMR_INCIDENT_MAX_NEW_PER_SWEEP', value: '10' }
        // Native APIM backups go to the app's own account, container apim-backups, reached by each
        // instance's managed identity (which needs Storage Blob Data Contributor there).
        { name: 'APIMR_BACKUP_STORAGE_ACCOUNT', value: storage.name }
        { name: 'APIMR_BACKUP_CONTAINER', value: backupContainer }
        { name: 'APIMR_BACKUP_BLOB_ENDPOINT', value: '' }
        { name: 'APIMR_BACKUP_ACCESS', value: 'ManagedIdentity' }
        { name: 'APIMR_BACKUP_IDENTITY_CLIENT_ID', value: '' }
        { name: 'APIMR_BACKUP_ACCESS_KEY_SECRET', value: '' }
        // The backup timers tick every 15 minutes; the policy decides when a job is due.
        { name: 'APIMR_BACKUP_SCHEDULE', value: '0 */15 * * * *' }
        { name: 'APIMR_RESTORE_TEST_SCHEDULE', value: '0 7-59/15 * * * *' }
        { name: 'APIMR_API_AUDIENCE', value: apiAudience }
        { name: 'APIMR_API_TENANT_ID', value: apiTenantId }
      ]
    }
  }
}

// Built-in role ids ("Azure built-in roles").
var roles = {
  storageBlobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  storageQueueDataContributor: '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
  storageTableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
  monitoringMetricsPublisher: '3913510d-42f4-4e42-8a64-420c390055eb'
  keyVaultSecretsOfficer: 'b86a8fe4-44ce-4948-aee5-eccb2c155cd7'
  logAnalyticsReader: '73c42c96-874c-492b-b04d-ab87d138a893'
}

// The Functions host (leases, the deployment package) needs Blob Data Owner on AzureWebJobsStorage;
// the product's queue, journal and ledger tables need the queue and table roles.
resource storageRoles 'Microsoft.Authorization/roleAssignments@2022-04-01' = [
  for role in [roles.storageBlobDataOwner, roles.storageQueueDataContributor, roles.storageTableDataContributor]: {
    name: guid(storage.id, identity.id, role)
    scope: storage
    properties: {
      principalId: identity.properties.principalId
      principalType: 'ServicePrincipal'
      roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', role)
    }
  }
]

resource insightsRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(insights.id, identity.id, roles.monitoringMetricsPublisher)
  scope: insights
  properties: {
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.monitoringMetricsPublisher)
  }
}

// The key ledger is written (onboarding, rotation) and SEC-001 moves secrets into vaults.
resource vaultRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, identity.id, roles.keyVaultSecretsOfficer)
  scope: vault
  properties: {
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.keyVaultSecretsOfficer)
  }
}

output functionAppId string = app.id
output functionAppName string = app.name
output identityPrincipalId string = identity.properties.principalId
output identityClientId string = identity.properties.clientId
output storageAccountName string = storage.name
output backupContainerName string = backupContainer
output keyVaultName string = vault.name
output keyVaultUri string = vault.properties.vaultUri
output logAnalyticsWorkspaceId string = logs.id
