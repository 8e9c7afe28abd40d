// Lets apim-remediator post incidents to Microsoft Sentinel
// (APIMR_INCIDENT_SENTINEL_WORKSPACE). Deploy it to the resource group of the Sentinel
// workspace, which is often in a security subscription of its own:
//
//   az deployment group create -g <workspace group> --subscription <workspace subscription> \
//     -f infra/sentinel-role.bicep -p workspaceName=<name> principalId=<main.bicep output IDENTITY_PRINCIPAL_ID>
//
// main.bicep deploys it itself when its sentinelWorkspaceId parameter names the workspace.
//
// The built-in "Microsoft Sentinel Responder" role on the one workspace, rather than Sentinel
// actions in the product's subscription role: it is the role a SOC already grants to
// automation that manages incidents, it is scoped to the workspace (not every subscription
// in scope), and it covers exactly what the product does there
// (Microsoft.SecurityInsights/incidents/read and /write through Microsoft.SecurityInsights/incidents/*).
// The twin's RBAC (twin/rbac.py) carries the same built-in with the same id and actions.

param workspaceName string
param principalId string

var sentinelResponder = '3e150937-b8fe-4cfb-8069-0eaf05ecd056'

resource workspace 'Microsoft.OperationalInsights/workspaces@2023-09-01' existing = {
  name: workspaceName
}

resource sentinelRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(workspace.id, principalId, sentinelResponder)
  scope: workspace
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', sentinelResponder)
  }
}
