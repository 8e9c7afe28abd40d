// The product's rights on one subscription in scope: a custom role with exactly the Azure
// actions handlers/scan.py and handlers/remediate.py name in their docstrings, assigned to
// the Function App's managed identity. main.bicep deploys it once per subscription in scope
// (scopeSubscriptionIds); by hand, for a subscription added later:
//   az deployment sub create -l <region> -f infra/subscription-role.bicep \
//     -p principalId=<main.bicep output IDENTITY_PRINCIPAL_ID> allowRemediation=true
// With allowRemediation=false the identity can scan but write nothing. The twin loads this
// same file for the least-privilege tests, so what is deployed is what was proven.
targetScope = 'subscription'

@description('Object id of the Function App\'s system-assigned identity (main.bicep output principalId).')
param principalId string

@description('Grant the write actions remediation needs; false = detection only.')
param allowRemediation bool = false

var readActions = [
  // Resource Graph shows a subscription's own row only to callers who may read it; the
  // inventory checks that row so a subscription it cannot see is an error, not a clean scan.
  'Microsoft.Resources/subscriptions/read'
  'Microsoft.ResourceGraph/resources/read'
  'Microsoft.ApiManagement/service/read'
  'Microsoft.ApiManagement/service/*/read'
  // Only for subscriptions tracked in the key ledger, to compare keyed hashes.
  'Microsoft.ApiManagement/service/subscriptions/listSecrets/action'
  'Microsoft.Insights/diagnosticSettings/read'
]

var writeActions = [
  'Microsoft.ApiManagement/service/write'
  'Microsoft.ApiManagement/service/tenant/write'
  'Microsoft.ApiManagement/service/portalsettings/write'
  'Microsoft.ApiManagement/service/portalconfigs/write'
  'Microsoft.ApiManagement/service/subscriptions/write'
  // Key rotation (KEY-002/003/004, handlers/rotate_keys.py): regenerate the slot clients do not use.
  'Microsoft.ApiManagement/service/subscriptions/regeneratePrimaryKey/action'
  'Microsoft.ApiManagement/service/subscriptions/regenerateSecondaryKey/action'
  // Self-hosted gateway tokens (handlers/rotate_gateways.py): read the keys, regenerate the one
  // the vault's token was not made from, make a token from it.
  'Microsoft.ApiManagement/service/gateways/listKeys/action'
  'Microsoft.ApiManagement/service/gateways/regenerateKey/action'
  'Microsoft.ApiManagement/service/gateways/generateToken/action'
  'Microsoft.ApiManagement/service/namedValues/write'
  'Microsoft.ApiManagement/service/namedValues/listValue/action'
  'Microsoft.ApiManagement/service/apis/write'
  'Microsoft.ApiManagement/service/backends/write'
  'Microsoft.ApiManagement/service/loggers/write'
  'Microsoft.ApiManagement/service/diagnostics/write'
  // CERT-003: APIM re-reads a Key Vault-linked certificate the vault has renewed.
  'Microsoft.ApiManagement/service/certificates/refreshSecret/action'
  'Microsoft.Insights/diagnosticSettings/write'
  // LOG-001 sends gateway logs to a workspace: ARM's linked check on a diagnostic setting
  // requires this on the destination workspace, or the PUT fails LinkedAuthorizationFailed.
  'Microsoft.OperationalInsights/workspaces/sharedKeys/action'
  // Reads, but only remediation needs them: KEY-001 suspends a key only once the gateway logs
  // show it unused (the workspace's customerId, then a Log Analytics query), and reconcile
  // runs the runtime signals (LOG-004, THR-001..005) as queries. A workspace in another
  // subscription needs these two granted there as well.
  'Microsoft.OperationalInsights/workspaces/read'
  'Microsoft.OperationalInsights/workspaces/query/read'
  // handlers/backup.py and handlers/restore_test.py: native backup into the backup storage
  // account, and test-restores into the designated restore targets (restore overwrites them).
  'Microsoft.ApiManagement/service/backup/action'
  'Microsoft.ApiManagement/service/restore/action'
]

var roleName = allowRemediation ? 'APIM Remediator (remediate)' : 'APIM Remediator (detect)'

resource role 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: guid(subscription().id, roleName)
  properties: {
    roleName: roleName
    description: 'apim-remediator: read APIM security configuration${allowRemediation ? ' and fix drift' : ''}.'
    type: 'CustomRole'
    assignableScopes: [subscription().id]
    permissions: [
      {
        actions: allowRemediation ? concat(readActions, writeActions) : readActions
        notActions: []
        dataActions: []
        notDataActions: []
      }
    ]
  }
}

resource assignment 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(subscription().id, principalId, role.id)
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: role.id
  }
}

// The Key Vault of APIMR_KEY_VAULT_URL needs data-plane roles on that vault: "Key Vault
// Secrets User" (4633458b-17de-408a-b874-0445c86b69e6) to read the key ledger, and for
// SEC-001 remediation "Key Vault Secrets Officer" (b86a8fe4-44ce-4948-aee5-eccb2c155cd7).
// Assign them at the vault's scope (a resource-group deployment), e.g. with
//   az role assignment create --assignee-object-id <principalId> --role "Key Vault Secrets User" --scope <vault id>

output roleDefinitionId string = role.id
