"""Use cases: one module each. Handlers take plain requests and dependencies; they never
import azure.functions and never construct clients (shared.azure does)."""
