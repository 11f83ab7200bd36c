"""The Python client: needs only Ray at import time."""
