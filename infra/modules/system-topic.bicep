// One Event Grid system topic on a source (a subscription, the key-ledger vault, an APIM
// instance) and one event subscription delivering the given event types to the app's
// `events` function. An Azure resource can carry only one system topic: where one exists
// already, pass its name as topicName and this template adds the subscription to it.
targetScope = 'resourceGroup'

@description('Name of the system topic.')
param topicName string

@description('Region of the topic: \'global\' for a subscription, else the source\'s region.')
param location string

@description('Resource id of the source (a subscription id for Microsoft.Resources.Subscriptions).')
param sourceId string

@description('Topic type, e.g. Microsoft.Resources.Subscriptions, Microsoft.KeyVault.vaults, Microsoft.ApiManagement.Service.')
param topicType string

@description('Event types delivered to the app (each one handlers/events.py routes).')
param includedEventTypes array

@description('Advanced filters (Event Grid schema), e.g. only resources under an APIM service.')
param advancedFilters array = []

@description('Resource id of the Function App.')
param functionAppId string

@description('Tags for the topic.')
param tags object

resource topic 'Microsoft.EventGrid/systemTopics@2025-02-15' = {
  name: topicName
  location: location
  tags: tags
  properties: {
    source: sourceId
    topicType: topicType
  }
}

resource toApp 'Microsoft.EventGrid/systemTopics/eventSubscriptions@2025-02-15' = {
  parent: topic
  name: 'apim-remediator'
  properties: {
    destination: {
      endpointType: 'AzureFunction'
      properties: {
        resourceId: '${functionAppId}/functions/events'
        // One event per invocation: each event is its own unit of work (ledger, reconcile).
        maxEventsPerBatch: 1
        preferredBatchSizeInKilobytes: 64
      }
    }
    eventDeliverySchema: 'EventGridSchema'
    filter: {
      includedEventTypes: includedEventTypes
      advancedFilters: advancedFilters
      enableAdvancedFilteringOnArrays: true
    }
    // Event Grid's own retry (24 h): the handler re-raises only what is worth delivering again.
    retryPolicy: {
      maxDeliveryAttempts: 30
      eventTimeToLiveInMinutes: 1440
    }
  }
}
