"""The modality-agnostic data layer: shard format, writer, stream, manifests, prepare options, statistics,
the indexed synthetic stream, the synthetic-shapes drawing shared by image and video, and the pinned,
asynchronous copy of a batch to the training device."""
