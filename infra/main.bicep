// apim-remediator: the Function App, its system-assigned identity and its own storage.
// Deploy into a resource group:
//   az deployment group create -g <rg> -f infra/main.bicep -p subscriptionIds=<id,...>
// This template grants what the app needs on its own resources (its storage, by identity).
// Its rights on the APIM instances in scope come from infra/subscription-role.bicep, one
// deployment per subscription, with exactly the actions the handlers name.

@description('Region for every resource.')
param location string = resourceGroup().location

@description('Short name prefix (3-11 lowercase letters and digits).')
@minLength(3)
@maxLength(11)
param prefix string = 'apimrem'

@description('Comma-separated subscription ids the remediator may act on (APIMR_SUBSCRIPTION_IDS).')
param subscriptionIds string

@description('When the sweep fans out: six-field NCRONTAB, seconds first (APIMR_SWEEP_SCHEDULE).')
param sweepSchedule string = '0 0 */6 * * *'

var suffix = uniqueString(resourceGroup().id)
var storageName = take('${prefix}${suffix}', 24)

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: storageName
  location: location
  kind: 'StorageV2'
  sku: { name: 'Standard_LRS' }
  properties: {
    minimumTlsVersion: 'TLS1_2'
    allowBlobPublicAccess: false
    // Identity only: no account keys, no connection strings.
    allowSharedKeyAccess: false
    supportsHttpsTrafficOnly: true
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: 'app-package'
}

resource logs 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: '${prefix}-logs-${suffix}'
  location: location
  properties: {
    sku: { name: 'PerGB2018' }
    retentionInDays: 30
  }
}

resource insights 'Microsoft.Insights/components@2020-02-02' = {
  name: '${prefix}-ai-${suffix}'
  location: location
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: logs.id
    DisableLocalAuth: true
  }
}

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: '${prefix}-plan-${suffix}'
  location: location
  kind: 'functionapp'
  sku: { tier: 'FlexConsumption', name: 'FC1' }
  properties: { reserved: true }
}

resource app 'Microsoft.Web/sites@2024-04-01' = {
  name: '${prefix}-func-${suffix}'
  location: location
  kind: 'functionapp,linux'
  identity: { type: 'SystemAssigned' }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}app-package'
          authentication: { type: 'SystemAssignedIdentity' }
        }
      }
      runtime: { name: 'python', version: '3.11' }
      scaleAndConcurrency: { maximumInstanceCount: 40, instanceMemoryMB: 2048 }
    }
    siteConfig: {
      minTlsVersion: '1.2'
      ftpsState: 'Disabled'
      appSettings: [
        { name: 'AzureWebJobsStorage__accountName', value: storage.name }
        { name: 'AzureWebJobsStorage__credential', value: 'managedidentity' }
        { name: 'APPLICATIONINSIGHTS_AUTHENTICATION_STRING', value: 'Authorization=AAD' }
        { name: 'APPLICATIONINSIGHTS_CONNECTION_STRING', value: insights.properties.ConnectionString }
        { name: 'APIMR_CLOUD', value: 'AzureCloud' }
        { name: 'APIMR_SUBSCRIPTION_IDS', value: subscriptionIds }
        { name: 'APIMR_STORAGE_ACCOUNT', value: storage.name }
        // The host resolves %APIMR_SWEEP_SCHEDULE% and %APIMR_WORK_QUEUE% in the bindings itself
        // and will not start those functions without them.
        { name: 'APIMR_SWEEP_SCHEDULE', value: sweepSchedule }
        // The backup timers tick every 15 minutes; the policy decides when a job is due.
        { name: 'APIMR_BACKUP_SCHEDULE', value: '0 */15 * * * *' }
        { name: 'APIMR_RESTORE_TEST_SCHEDULE', value: '0 7-59/15 * * * *' }
        { name: 'APIMR_WORK_QUEUE', value: 'apimr-work' }
      ]
    }
  }
}

// Built-in role ids.
var roles = {
  storageBlobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  storageQueueDataContributor: '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
  storageTableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
  monitoringMetricsPublisher: '3913510d-42f4-4e42-8a64-420c390055eb'
}

resource storageRoles 'Microsoft.Authorization/roleAssignments@2022-04-01' = [
  for role in [roles.storageBlobDataOwner, roles.storageQueueDataContributor, roles.storageTableDataContributor]: {
    name: guid(storage.id, app.id, role)
    scope: storage
    properties: {
      principalId: app.identity.principalId
      principalType: 'ServicePrincipal'
      roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', role)
    }
  }
]

resource insightsRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(insights.id, app.id, roles.monitoringMetricsPublisher)
  scope: insights
  properties: {
    principalId: app.identity.principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.monitoringMetricsPublisher)
  }
}

output functionAppName string = app.name
output principalId string = app.identity.principalId
output storageAccountName string = storage.name
