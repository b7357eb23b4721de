"""DALI pipelines (placeholder until the DALI loader lands)."""


def available() -> bool:
    return False
