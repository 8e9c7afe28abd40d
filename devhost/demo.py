"""`make demo`: the product's CLI, end to end, against the twin seeded from estates/demo.yaml.

Starts the twin (and Azurite), then runs, as an operator would: a scan, a dry run of the
fixes for the drifted production instance, the fixes themselves, and a rescan. Each step
is the installed `apim-remediator` command in a fresh process configured only through
the environment, exactly like a deployment.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from twin.server import TwinServer

ROOT = Path(__file__).resolve().parents[1]
ESTATE = ROOT / "estates" / "demo.yaml"
POLICY = Path(__file__).resolve().parent / "demo-policy.yaml"
PROD = (
    "/subscriptions/6a0e2f31-0000-4000-8000-0000000de001/resourceGroups/rg-apim-prod"
    "/providers/Microsoft.ApiManagement/service/apim-contoso-prod"
)
COMMAND = str(Path(sys.executable).with_name("apim-remediator"))


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def run(env: dict[str, str], *args: str) -> int:
    print(f"$ apim-remediator {' '.join(args)}", flush=True)
    return subprocess.run([COMMAND, *args], env=env, check=False).returncode


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="apim-remediator-demo-"))
    banner("starting the twin (a local Azure) from estates/demo.yaml")
    twin = TwinServer(ESTATE, workdir)
    twin.start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("APIMR_", "AZURE_"))}
        env.update(twin.env())
        env["APIMR_KEY_VAULT_URL"] = twin.state.urls["vault:kv-apim-keys-prod"]
        env["APIMR_POLICY_FILE"] = str(POLICY)
        for name, url in sorted(twin.state.urls.items()):
            print(f"  {name:<26} {url}")
        banner("1. scan every APIM instance in scope")
        run(env, "scan", "--quiet")
        banner("2. dry run: what the product would change on apim-contoso-prod")
        run(env, "remediate", "--instance", PROD)
        banner("3. apply: the rules the policy puts in remediate mode")
        applied = run(env, "remediate", "--instance", PROD, "--apply")
        banner("4. rescan: what is left for people (detect-only rules, refused fixes)")
        run(env, "scan", "--quiet", "--instance", PROD)
        banner("done")
        print("The apply step exits 1 because NET-001 and SEC-001 were refused: public access stays until a")
        print("private endpoint exists, and the secret named value moves into Key Vault on a later run, once")
        print("the system-assigned identity the apply just turned on holds 'Key Vault Secrets User' on the vault.")
        print("Everything else the policy allows was fixed, verified and journaled.")
        return 0 if applied in (0, 1) else applied
    finally:
        twin.stop()


if __name__ == "__main__":
    sys.exit(main())
