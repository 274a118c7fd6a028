"""Dataset parsers, SynthPEDES, transforms, tokenizers and loaders."""
