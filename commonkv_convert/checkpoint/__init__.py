"""The two I/O edges of the pipeline: a lazy source-model reader and an atomic, sharded writer."""
