"""MongoDB: the saga store, its indexes and transactions, the outbox, inbox and command log, the operators' views."""
