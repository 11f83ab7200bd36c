"""MongoDB: the saga store, its indexes and transactions; the embedded dev server launcher."""
