"""The ``essential`` command line (nothing imports it)."""
