"""gRPC front end tests (a package, so its conftest does not shadow tests/conftest.py; not named
`grpc`, which would shadow grpcio)."""
