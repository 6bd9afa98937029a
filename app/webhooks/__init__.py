"""Webhooks: an event per job end, signed per Standard Webhooks, delivered with retries by the
I/O worker, to URLs that pass the SSRF guard."""
