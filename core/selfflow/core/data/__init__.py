"""The modality-agnostic data layer: shard format, writer, stream, manifests, prepare options, statistics,
the indexed synthetic stream and the synthetic-shapes drawing shared by image and video."""
