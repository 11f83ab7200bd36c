"""Infrastructure on Ray: the actors that run sagas, Kafka, HTTP, the client, the CLI and the dev stack.

Rooms by role: ``sagas`` (runtime actors), ``kafka``, ``http``, ``client``, ``cli``, ``dev``;
the modules beside them (names, settings, errors, logs, metrics, tracing) are shared by all.
"""
