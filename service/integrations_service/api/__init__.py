"""gRPC surface: servicers, status mapping, interceptors and server assembly."""
