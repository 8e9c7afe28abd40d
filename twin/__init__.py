"""The Azure twin: a strict, wire-compatible local Azure for the product's calls.

Tests and the demo only. Product code never imports this package (a test checks).
Services: an Entra-like token service, ARM (APIM, Insights diagnostic settings, Resource
Graph, Sentinel incidents), Key Vault secrets (one HTTPS port per vault), Log Analytics
query, Event Grid delivery, and a control API under `/_twin/` for tests.
"""
