"""What tests call: launches, test data, layouts and schemas (fixtures are in tests/conftest.py)."""
