// One built-in role for the remediator's identity on a Log Analytics workspace in this resource
// group: Log Analytics Reader where the runtime rules query gateway logs outside the
// subscriptions in scope, Microsoft Sentinel Responder where incidents go.
targetScope = 'resourceGroup'

@description('Name of the workspace in this resource group.')
param workspaceName string

@description('Built-in role definition id (a GUID).')
param roleId string

@description('Object id of the remediator\'s identity.')
param principalId string

resource workspace 'Microsoft.OperationalInsights/workspaces@2023-09-01' existing = {
  name: workspaceName
}

resource assignment 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(workspace.id, principalId, roleId)
  scope: workspace
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleId)
  }
}
