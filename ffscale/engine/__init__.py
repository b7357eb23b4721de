"""Everything that talks to DeepSpeed lives in this package."""
