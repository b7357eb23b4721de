"""Scripts the real launcher runs in place of ffscale/train.py to inject a fault (imported by the
tests that launch them, so a moved file fails at import)."""
