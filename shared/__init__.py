"""apim-remediator's machinery: settings, clients, rules, actions. Never imports azure.functions."""

__version__ = "0.1.0"
