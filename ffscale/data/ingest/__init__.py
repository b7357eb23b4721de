"""Images -> shards, offline: image sources (Fashion-MNIST, folders, ImageNet's layouts), the
parallel resumable writer, image conversion, indexing of other tools' shards."""
