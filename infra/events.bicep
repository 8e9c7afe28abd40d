// Event Grid to the app's `events` function, deployed after the code (azure.yaml's postdeploy
// hook runs infra/scripts/wire-events.sh; Event Grid validates an AzureFunction destination
// when the subscription is created, so the function must exist):
//   - every subscription in scope: resource writes, actions and deletes under APIM services
//     (the drift the app undoes within seconds);
//   - the key-ledger vault: secret near-expiry and expired (key rotation);
//   - APIM instances the operator opts in (apimServices): subscription created (onboarding to
//     the ledger) and gateway token near expiry.
// A test checks that these event types are exactly the ones handlers/events.py routes.
targetScope = 'subscription'

@description('Region for the events resource groups and the vault topic.')
param location string

@description('Resource id of the Function App (main.bicep output FUNCTION_APP_ID).')
param functionAppId string

@description('Comma-separated subscriptions in scope (main.bicep output SCOPE_SUBSCRIPTION_IDS).')
param scopeSubscriptionIds string

@description('Resource group of the app and its vault (main.bicep output AZURE_RESOURCE_GROUP).')
param appResourceGroupName string

@description('The key-ledger vault (main.bicep output KEY_VAULT_NAME).')
param keyVaultName string

@description('Resource group for each subscription\'s system topic.')
param eventsResourceGroupName string = 'rg-apimr-events'

@description('APIM instances whose own events the app receives: [{id, location}], opt-in.')
param apimServices array = []

@description('Tags for what this creates.')
param tags object = {}

var resourceEventTypes = [
  'Microsoft.Resources.ResourceWriteSuccess'
  'Microsoft.Resources.ResourceActionSuccess'
  'Microsoft.Resources.ResourceDeleteSuccess'
]
var vaultEventTypes = [
  'Microsoft.KeyVault.SecretNearExpiry'
  'Microsoft.KeyVault.SecretExpired'
]
var apimEventTypes = [
  'Microsoft.ApiManagement.SubscriptionCreated'
  'Microsoft.ApiManagement.GatewayTokenNearExpiry'
]

module subscriptions 'modules/subscription-events.bicep' = [
  for sub in split(scopeSubscriptionIds, ','): {
    name: 'apimr-events-${uniqueString(sub, functionAppId)}'
    scope: subscription(trim(sub))
    params: {
      eventsResourceGroupName: eventsResourceGroupName
      location: location
      includedEventTypes: resourceEventTypes
      functionAppId: functionAppId
      tags: tags
    }
  }
]

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: keyVaultName
  scope: resourceGroup(appResourceGroupName)
}

module vaultTopic 'modules/system-topic.bicep' = {
  name: 'apimr-events-vault'
  scope: resourceGroup(appResourceGroupName)
  params: {
    topicName: 'apimr-${keyVaultName}'
    location: location
    sourceId: vault.id
    topicType: 'Microsoft.KeyVault.vaults'
    includedEventTypes: vaultEventTypes
    functionAppId: functionAppId
    tags: tags
  }
}

module apimTopics 'modules/system-topic.bicep' = [
  for service in apimServices: {
    name: 'apimr-events-${uniqueString(service.id)}'
    scope: resourceGroup(split(service.id, '/')[2], split(service.id, '/')[4])
    params: {
      topicName: 'apimr-${last(split(service.id, '/'))}'
      location: service.location
      sourceId: service.id
      topicType: 'Microsoft.ApiManagement.Service'
      includedEventTypes: apimEventTypes
      functionAppId: functionAppId
      tags: tags
    }
  }
]
