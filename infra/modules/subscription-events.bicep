// Event Grid for one subscription in scope: a resource group for its system topic (a system
// topic lives in the subscription it watches) and the topic delivering resource writes,
// actions and deletes under APIM services to the app.
targetScope = 'subscription'

@description('Resource group for the subscription\'s system topic.')
param eventsResourceGroupName string

@description('Region of that resource group.')
param location string

@description('Event types delivered (events.bicep: resourceEventTypes).')
param includedEventTypes array

@description('Resource id of the Function App.')
param functionAppId string

@description('Tags for what this creates.')
param tags object

resource group 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: eventsResourceGroupName
  location: location
  tags: tags
}

module topic 'system-topic.bicep' = {
  name: 'apimr-subscription-topic'
  scope: group
  params: {
    topicName: 'apimr-${subscription().subscriptionId}'
    location: 'global'
    sourceId: subscription().id
    topicType: 'Microsoft.Resources.Subscriptions'
    includedEventTypes: includedEventTypes
    // Only resources at or under an API Management service: the subject is the resource id.
    advancedFilters: [
      {
        operatorType: 'StringContains'
        key: 'subject'
        values: ['/providers/Microsoft.ApiManagement/service/']
      }
    ]
    functionAppId: functionAppId
    tags: tags
  }
}
