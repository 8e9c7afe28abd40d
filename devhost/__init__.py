"""Local development host: a stand-in for the Azure Functions host (`python -m devhost start`,
`devhost.host.DevHost`) and the demo against the twin (`python -m devhost.demo`). Tests,
demo and benchmarks only: production runs on the Functions host (`func start` or Azure)."""
