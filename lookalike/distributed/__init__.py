"""Distributed work on Ray: the ingest executor and index shards built on a cluster."""
