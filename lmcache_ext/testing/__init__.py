"""Helpers that the tests and the benchmarks share: the KV layouts vLLM hands to a
connector, and real Redis/Valkey servers on 127.0.0.1. Not used when serving."""
