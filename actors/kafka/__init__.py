"""Kafka: the gateway actor (commands in, outbox out, participants' replies in) and Kafka steps."""
