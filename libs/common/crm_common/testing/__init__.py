"""Test harness: real PostgreSQL and broker, per-test databases and topics, in-process apps."""
