"""Network access to a collection: a REST API with a web page, and gRPC services."""
