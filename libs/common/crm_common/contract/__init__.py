"""The external event contract (CONTRACT.md) and the internal topic messages."""
