"""Driver around the segresnet2d Auto3DSeg template: data, evaluation and the pipeline."""
