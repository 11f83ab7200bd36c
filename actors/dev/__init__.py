"""The local dev stack: embedded MongoDB and Kafka, a local Ray head, the demo (imported by the CLI and tests only)."""
