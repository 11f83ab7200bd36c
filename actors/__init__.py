"""Ray: saga actors, supervisor, gateway, the client API, the CLI and the local stack."""
