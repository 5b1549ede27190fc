"""All I/O: model providers, tools, the ledger. Activities are registered by `workers`."""
