"""The integrations credential service."""
