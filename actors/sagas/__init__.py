"""The Ray actors that run sagas: the supervisor, dedicated saga actors, shared hosts and their placement."""
