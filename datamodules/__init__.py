"""LightningDataModules, WebDataset shard reading and writing, data generators and importers."""
