"""Dataset parsers, SynthPEDES, transforms, tokenizers and loaders."""

from tbps.data.datasets import (
    DATASETS,
    ImageRecord,
    PersonSearchDataset,
    check_images,
    load_dataset,
    register_dataset,
)

__all__ = ["DATASETS", "ImageRecord", "PersonSearchDataset", "check_images", "load_dataset", "register_dataset"]
