"""Shards -> batches on the device. Only this package knows webdataset and DALI."""
