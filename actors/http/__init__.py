"""HTTP: the platform's routes, served by Ray Serve."""
