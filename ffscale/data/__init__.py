"""Shards -> batches on the device: loaders, the per-rank plan, manifests, samples, checks and
augmentation. Only this package knows webdataset and DALI (ingest/ writes shards offline)."""
