"""Small business services the example jobs call, one module per service.

Each owns one MongoDB database (``inventory``, ``financial``, ``billing``,
``notify``, ``logistic``, ``users``, ``sales``; prefixed by
``ESSENTIAL_EXAMPLES_DB_PREFIX``) and applies every effect exactly once per
idempotency key through :mod:`examples.services.ledger`.
"""
