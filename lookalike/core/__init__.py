"""The core: the collection façade and the parts it is made of (ingest, search, derived files)."""
